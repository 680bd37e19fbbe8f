"""`treespec generate`: text from the artifacts with tree speculative decoding.

Every argument is checked before the model is loaded (5-20 s for SmolLM2 on the CPU), so a typo
costs a second, not a load: the prompts, the request's numbers (api.check_request), the tree
(parsed and held to the target graph's profile) and the drafter name against the manifest.
`--json` prints JSON Lines: one object per prompt, in prompt order.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treespec.artifacts import load_manifest
from treespec.errors import InputError
from treespec.progress import heartbeat
from treespec.runtime.api import SpeculativeGenerator, check_request, check_tree_fits, encode_prompt
from treespec.runtime.loader import load_tokenizer
from treespec.runtime.prompts import PromptEncoder, read_prompts
from treespec.runtime.trees.presets import read_tree_config

LONG_PREFILL_TOKENS = 512  # prompts at least this long get a prefill notice (~35 ms/token on 2 CPU cores)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", required=True, type=Path, help="artifact directory from treespec-export")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable: a batch)")
    p.add_argument("--prompts-file", type=Path, help="JSONL file with a 'prompt' or 'messages' field per line")
    p.add_argument("--json", action="store_true",
                   help="print JSON Lines: one object per prompt with prompt, text, token_ids and stats")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "tensorrt-rtx", "torch"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--drafter", help="lookup, medusa, draft or none (default: the manifest's)")
    p.add_argument("--tree", help="none, a preset name (e.g. auto, adaptive, opt32, longspec), a YAML file "
                                  "or inline JSON (default: the drafter's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, help="sampling seed, an integer in [0, 2^63)")
    p.add_argument("--acceptance", default="exact", choices=["exact", "typical"],
                   help="exact: lossless speculative sampling (default); typical: Medusa's typical "
                        "acceptance, LOSSY (output no longer follows the target's distribution)")
    p.add_argument("--posterior-threshold", type=float, default=0.09,
                   help="typical acceptance (LOSSY): accept p(token) > min(this, alpha * exp(-entropy))")
    p.add_argument("--posterior-alpha", type=float, default=0.3, help="typical acceptance (LOSSY): alpha")
    p.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime")
    p.add_argument("--raw-prompt", "--raw", dest="raw", action="store_true",
                   help="do not apply the chat template; the text is tokenized as given, control tokens "
                        "such as <|im_start|> included (by default user text is plain text)")


@dataclass
class Request:
    """A generate invocation, checked: what the model is asked once it is loaded."""

    prompts: list[Any]
    kwargs: dict[str, Any]
    prompt_tokens: int  # all prompts together, chat template included


def check_args(args) -> Request:
    """Everything that can be checked without loading the model; problems are InputErrors."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    if not prompts:
        raise InputError("give --prompt TEXT (repeatable) or --prompts-file FILE.jsonl")
    if args.threads is not None and args.threads <= 0:
        raise InputError(f"--threads must be positive, got {args.threads}")
    check_request(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, args.acceptance,
                  args.posterior_threshold, args.posterior_alpha)
    tree = read_tree_config(args.tree) if args.tree is not None else None
    manifest = load_manifest(args.artifacts)
    if args.drafter not in (None, "none") and args.drafter not in manifest.drafters:
        raise InputError(f"these artifacts have no '{args.drafter}' drafter (they have: "
                         f"{', '.join(manifest.drafters) or 'none'})")
    if tree is not None:
        check_tree_fits(manifest, tree)
    encoder = PromptEncoder(load_tokenizer(manifest))  # ~0.3 s; the prompts are checked against the context
    prompt_tokens = sum(len(encode_prompt(encoder, manifest, p, args.raw)) for p in prompts)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, tree=tree, raw=args.raw, acceptance=args.acceptance,
                  posterior_threshold=args.posterior_threshold, posterior_alpha=args.posterior_alpha)
    return Request(prompts, kwargs, prompt_tokens)


def run(args) -> int:
    request = check_args(args)
    gen = SpeculativeGenerator.from_artifacts(args.artifacts, args.backend, args.device,
                                              threads=args.threads, drafter=args.drafter)
    if request.prompt_tokens >= LONG_PREFILL_TOKENS:
        print(f"prefill: {request.prompt_tokens} prompt tokens before the first token (about "
              f"{request.prompt_tokens * 0.035:.0f} s for SmolLM2-135M on 2 CPU cores)", file=sys.stderr, flush=True)
    if args.json or len(request.prompts) > 1:
        with _ticking("generating"):
            results = gen.generate_batch(request.prompts, **request.kwargs)
        for prompt, result in zip(request.prompts, results):
            if args.json:
                print(json.dumps({"prompt": prompt, "text": result.text, "token_ids": result.token_ids,
                                  "stats": result.stats}), flush=True)
            else:
                print(result.text, "\n---")
        if not args.json:
            print(json.dumps(results[0].stats), file=sys.stderr)
        return 0
    _stream(gen, request)
    return 0


def _stream(gen: SpeculativeGenerator, request: Request) -> None:
    chunks = gen.stream(request.prompts[0], **request.kwargs)
    with _ticking("prefill"):
        first = next(chunks, None)
    for chunk in ([first] if first is not None else []):
        print(chunk.text, end="", flush=True)
    for chunk in chunks:
        print(chunk.text, end="", flush=True)
    print()
    stats = gen.engine.stats.as_dict()
    print(f"[{stats['new_tokens']} tokens, {stats['steps']} steps, {stats['mean_accepted']:.2f} tokens/step, "
          f"{stats['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)


def _ticking(label: str):
    """Elapsed seconds on stderr while a silent step runs (only on a terminal)."""
    def tick(elapsed: float) -> None:
        print(f"\r{label}: {elapsed:.0f} s", end="", file=sys.stderr, flush=True)

    return heartbeat(tick if sys.stderr.isatty() else None, clear=lambda: print("\r\033[K", end="",
                                                                                 file=sys.stderr, flush=True))

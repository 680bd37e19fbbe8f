"""The `treespec` command: generate, serve, triton-repo, train-medusa, train-draft, bench, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from treespec.cli_util import run_cli

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: (module under treespec.runtime.commands, help)
    "generate": ("generate", "generate text with tree speculative decoding"),
    "demo": ("demo", "export SmolLM2 + drafters if needed, then compare speculative vs. plain decoding"),
    "serve": ("serve", "serve the artifacts with a real Triton Inference Server"),
    "triton-repo": ("triton_repo", "write a Triton model repository for the artifacts"),
    "train-medusa": ("train", "train Medusa heads by self-distillation"),
    "train-draft": ("train", "train a small draft LM by self-distillation"),
    "bench": ("bench", "benchmark backends x drafters x trees against baselines"),
}


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", required=True, type=Path, help="artifact directory from treespec-export")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "tensorrt-rtx", "torch"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--drafter", help="lookup, medusa, draft or none (default: the manifest's)")
    p.add_argument("--tree", help="none, a preset name (e.g. auto, adaptive, opt32, longspec), a YAML file "
                                  "or inline JSON (default: the drafter's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--acceptance", default="exact", choices=["exact", "typical"],
                   help="exact: lossless speculative sampling (default); typical: Medusa's typical "
                        "acceptance, LOSSY (output no longer follows the target's distribution)")
    p.add_argument("--posterior-threshold", type=float, default=0.09,
                   help="typical acceptance (LOSSY): accept p(token) > min(this, alpha * exp(-entropy))")
    p.add_argument("--posterior-alpha", type=float, default=0.3, help="typical acceptance (LOSSY): alpha")
    p.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")


def _generate(args) -> int:
    from treespec.runtime.api import SpeculativeGenerator
    from treespec.errors import InputError

    prompts = list(args.prompt or [])
    if args.prompts_file:
        from treespec.runtime.prompts import read_prompts

        prompts += read_prompts(Path(args.prompts_file))
    if not prompts:
        raise InputError("give --prompt TEXT (repeatable) or --prompts-file FILE.jsonl")
    gen = SpeculativeGenerator.from_artifacts(args.artifacts, args.backend, args.device,
                                              threads=args.threads, drafter=args.drafter)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, tree=args.tree, raw=args.raw,
                  acceptance=args.acceptance, posterior_threshold=args.posterior_threshold,
                  posterior_alpha=args.posterior_alpha)
    if args.json or len(prompts) > 1:
        results = gen.generate_batch(prompts, **kwargs)
        if args.json:
            print(json.dumps([{"prompt": p, "text": r.text, "token_ids": r.token_ids, "stats": r.stats}
                              for p, r in zip(prompts, results)], indent=2))
        else:
            for r in results:
                print(r.text, "\n---")
            print(json.dumps(results[0].stats), file=sys.stderr)
        return 0
    for chunk in gen.stream(prompts[0], **kwargs):
        print(chunk.text, end="", flush=True)
    print()
    stats = gen.engine.stats.as_dict()
    print(f"[{stats['new_tokens']} tokens, {stats['steps']} steps, {stats['mean_accepted']:.2f} tokens/step, "
          f"{stats['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treespec", description="Tree speculative decoding runtime.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help=SUBCOMMANDS["generate"][1])
    add_generation_args(gen)
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable: a batch)")
    gen.add_argument("--prompts-file", help="JSONL file with a 'prompt' field per line")
    gen.add_argument("--json", action="store_true", help="print results and stats as JSON")
    gen.set_defaults(handler=_generate)
    for name, (module, help_text) in SUBCOMMANDS.items():
        if name == "generate":
            continue
        p = sub.add_parser(name, help=help_text)
        mod = _command_module(module)
        if mod is None:
            p.set_defaults(handler=_unavailable(name))
            continue
        mod.add_arguments(p, name) if module == "train" else mod.add_arguments(p)
        p.set_defaults(handler=mod.run)
    return parser


def _command_module(module: str):
    import importlib

    try:
        return importlib.import_module(f"treespec.runtime.commands.{module}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("treespec.runtime.commands"):
            return None
        raise


def _unavailable(name: str):
    def handler(args) -> int:
        print(f"error: 'treespec {name}' is not available in this installation", file=sys.stderr)
        return 2

    return handler


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`treespec demo`: export SmolLM2 with its drafters (once), then decode bench prompts with and
without speculation on the same backend and print the speed-up and mean accepted length.

Each drafter runs with the tree a user gets by default: on the CPU `auto` sized per step from the
verify-latency curve measured here (runtime/trees/auto.py), so a drafter that cannot pay on this
machine falls back to plain steps instead of slowing decoding down.

The export is the README's `treespec-export` command with the same defaults (artifacts/smollm2,
every drafter, a DEFAULT_MAX_CONTEXT of 2048 tokens), so the two share one artifact directory.
Each row shows per-prompt progress on a terminal: the first row alone takes ~80 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from treespec.errors import InputError
from treespec.exporter.cli import DEFAULT_MAX_CONTEXT, export_with_progress
from treespec.exporter.output_dir import written_by_treespec
from treespec.exporter.pipeline import ExportOptions
from treespec.runtime.api import SpeculativeGenerator
from treespec.runtime.prompts import BUNDLED_BENCH, read_prompts

DEMO_ARTIFACTS = Path("artifacts/smollm2")
DEMO_DRAFTERS = ["draft", "medusa", "lookup", "eagle"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", type=Path, default=DEMO_ARTIFACTS,
                   help=f"artifact directory (exported here first if it does not exist; default {DEMO_ARTIFACTS})")
    p.add_argument("--prompts", type=Path, default=BUNDLED_BENCH)
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--drafters", default=",".join(DEMO_DRAFTERS))
    p.add_argument("--threads", type=int)


def _export_if_missing(folder: Path) -> None:
    if written_by_treespec(folder):
        return
    print(f"exporting SmolLM2-135M-Instruct with its drafters to {folder} (a few minutes, once; the same "
          f"as: treespec-export smollm2-135m --out {folder} {' '.join('--drafter ' + d for d in DEMO_DRAFTERS)})",
          flush=True)
    export_with_progress(ExportOptions(model="smollm2-135m", out=folder, drafters=list(DEMO_DRAFTERS),
                                       max_context=DEFAULT_MAX_CONTEXT))


def _timed(gen, prompt, max_new_tokens, tree):
    start = time.perf_counter()
    result = gen.generate(prompt, max_new_tokens=max_new_tokens, tree=tree)
    return time.perf_counter() - start, result


def _side_by_side(plain, spec, prompts, max_new_tokens, label: str):
    """Plain and speculative decoding prompt by prompt, alternating, so that both see the same
    load (other work on a 2-core machine moves a row's speed by tens of percent)."""
    times, tokens, accepted, same = [0.0, 0.0], 0, [], True
    for prompt in tqdm(prompts, desc=label, unit="prompt", file=sys.stderr, leave=False,
                       disable=not sys.stderr.isatty()):
        plain_s, base = _timed(plain, prompt, max_new_tokens, "none")
        spec_s, result = _timed(spec, prompt, max_new_tokens, None)
        times[0] += plain_s
        times[1] += spec_s
        tokens += len(base.token_ids)
        accepted.append(result.stats["mean_accepted"])
        same &= result.token_ids == base.token_ids
    return tokens / times[0], tokens / times[1], statistics.mean(accepted), same


def _tree_label(spec) -> str:
    cfg = spec.default_tree
    if cfg.policy == "auto" and cfg.plan == "ahead":
        return f"auto tree (<= {cfg.budget} nodes, sized per step)"
    return f"{cfg.policy} tree"


def run(args) -> int:
    if args.num_prompts <= 0 or args.max_new_tokens <= 0:
        raise InputError("--num-prompts and --max-new-tokens must be positive")
    prompts = read_prompts(args.prompts, args.num_prompts)
    _export_if_missing(args.artifacts)
    print(f"{len(prompts)} prompts from {args.prompts.name}, {args.max_new_tokens} new tokens, greedy, "
          "ONNX Runtime on the CPU; each row alternates with plain decoding, prompt by prompt")
    plain = SpeculativeGenerator.from_artifacts(args.artifacts, threads=args.threads, drafter="lookup")
    plain.generate(prompts[0], max_new_tokens=8, tree="none")  # warm-up
    for kind in [d.strip() for d in args.drafters.split(",") if d.strip()]:
        if kind not in plain.manifest.drafters:
            print(f"{kind:34s} not in these artifacts")
            continue
        spec = SpeculativeGenerator.from_artifacts(args.artifacts, threads=args.threads, drafter=kind)
        spec.generate(prompts[0], max_new_tokens=8)  # warm-up (an `auto` tree measures its latency curve once)
        base_tps, tps, acc, same = _side_by_side(plain, spec, prompts, args.max_new_tokens, f"{kind} drafter")
        print(f"{kind + ' drafter, ' + _tree_label(spec):52s} {tps:7.1f} tokens/s  x{tps / base_tps:.2f} "
              f"(plain {base_tps:.1f})  {acc:.2f} tokens/step  "
              f"{'identical output' if same else 'OUTPUT DIFFERS'}", flush=True)
    return 0

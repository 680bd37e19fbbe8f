"""`treespec demo`: export SmolLM2 with its drafters (once), then decode bench prompts with and
without speculation on the same backend and print the speed-up and mean accepted length.

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


def _run(gen, prompts, max_new_tokens, tree, label: str):
    tokens, seconds, accepted, outputs = 0, 0.0, [], []
    for prompt in tqdm(prompts, desc=label, unit="prompt", file=sys.stderr, leave=False,
                       disable=not sys.stderr.isatty()):
        start = time.perf_counter()
        result = gen.generate(prompt, max_new_tokens=max_new_tokens, tree=tree)
        seconds += time.perf_counter() - start
        tokens += len(result.token_ids)
        accepted.append(result.stats["mean_accepted"])
        outputs.append(result.token_ids)
    return tokens / seconds, statistics.mean(accepted), outputs


def run(args) -> int:
    if args.num_prompts <= 0 or args.max_new_tokens <= 0:
        raise InputError("--num-prompts and --max-new-tokens must be positive")
    prompts = read_prompts(args.prompts, args.num_prompts)
    _export_if_missing(args.artifacts)
    print(f"{len(prompts)} prompts from {args.prompts.name}, {args.max_new_tokens} new tokens, greedy, "
          "ONNX Runtime on the CPU")
    gen = SpeculativeGenerator.from_artifacts(args.artifacts, threads=args.threads, drafter="lookup")
    gen.generate(prompts[0], max_new_tokens=8, tree="none")  # warm-up
    base_tps, _, base_out = _run(gen, prompts, args.max_new_tokens, "none", "plain decoding")
    print(f"{'plain decoding (--tree none)':34s} {base_tps:7.1f} tokens/s", flush=True)
    for kind in [d.strip() for d in args.drafters.split(",") if d.strip()]:
        if kind not in gen.manifest.drafters:
            print(f"{kind:34s} not in these artifacts")
            continue
        spec = SpeculativeGenerator.from_artifacts(args.artifacts, threads=args.threads, drafter=kind)
        tps, acc, out = _run(spec, prompts, args.max_new_tokens, None, f"{kind} drafter")
        same = "identical output" if out == base_out else "OUTPUT DIFFERS"
        print(f"{kind + ' drafter, ' + spec.default_tree.policy + ' tree':34s} {tps:7.1f} tokens/s  "
              f"x{tps / base_tps:.2f}  {acc:.2f} tokens/step  {same}", flush=True)
    return 0

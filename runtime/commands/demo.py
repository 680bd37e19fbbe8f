"""`treespec demo`: export SmolLM2 with its drafters (once), then decode bench prompts with and
without speculation on the same backend and print the speed-up and mean accepted length."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from treespec.runtime.prompts import BUNDLED_BENCH, read_prompts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/smollm2"),
                   help="artifact directory (exported here first if it does not exist)")
    p.add_argument("--prompts", type=Path, default=BUNDLED_BENCH)
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--drafters", default="draft,medusa,lookup")
    p.add_argument("--threads", type=int)


def _export_if_missing(folder: Path) -> None:
    from treespec.exporter.pipeline import ExportOptions, run_export

    if (folder / "manifest.json").is_file():
        return
    print(f"exporting SmolLM2-135M-Instruct with its drafters to {folder} (a few minutes, once)")
    run_export(ExportOptions(model="smollm2-135m", out=folder, drafters=["draft", "medusa", "lookup"],
                             max_context=2048), progress=lambda m: print(f"  {m}", flush=True))


def _run(gen, prompts, max_new_tokens, tree):
    tokens, seconds, accepted, outputs = 0, 0.0, [], []
    for prompt in prompts:
        start = time.perf_counter()
        result = gen.generate(prompt, max_new_tokens=max_new_tokens, tree=tree)
        seconds += time.perf_counter() - start
        tokens += len(result.token_ids)
        accepted.append(result.stats["mean_accepted"])
        outputs.append(result.token_ids)
    return tokens / seconds, statistics.mean(accepted), outputs


def run(args) -> int:
    from treespec.runtime.api import SpeculativeGenerator

    _export_if_missing(args.artifacts)
    prompts = read_prompts(args.prompts, args.num_prompts)
    print(f"{len(prompts)} prompts from {args.prompts.name}, {args.max_new_tokens} new tokens, greedy, "
          "ONNX Runtime on the CPU")
    gen = SpeculativeGenerator.from_artifacts(args.artifacts, threads=args.threads, drafter="lookup")
    gen.generate(prompts[0], max_new_tokens=8, tree="none")  # warm-up
    base_tps, _, base_out = _run(gen, prompts, args.max_new_tokens, "none")
    print(f"{'plain decoding (--tree none)':34s} {base_tps:7.1f} tokens/s")
    for kind in [d.strip() for d in args.drafters.split(",") if d.strip()]:
        if kind not in gen.manifest.drafters:
            print(f"{kind:34s} not in these artifacts")
            continue
        spec = SpeculativeGenerator.from_artifacts(args.artifacts, threads=args.threads, drafter=kind)
        tps, acc, out = _run(spec, prompts, args.max_new_tokens, None)
        same = "identical output" if out == base_out else "OUTPUT DIFFERS"
        print(f"{kind + ' drafter, ' + spec.default_tree.policy + ' tree':34s} {tps:7.1f} tokens/s  "
              f"x{tps / base_tps:.2f}  {acc:.2f} tokens/step  {same}")
    return 0

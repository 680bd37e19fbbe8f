"""Where the host time of a speculative step goes: `treespec` generation under cProfile.

    python tools/profile_step.py ARTIFACTS [--drafter eagle] [--tree default] [--device cuda]

Runs batch-1 greedy generation on bench prompts (after a warm-up that captures the CUDA graphs),
prints the generator's draft/verify/host split per step, then the same prompts under cProfile with
the functions that take most of the host's own time. On CUDA the time a function waits for the GPU
shows up in the call that synchronises (`.cpu()`, `.numpy()`), so read it beside the split.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats

from treespec.runtime.api import SpeculativeGenerator
from treespec.runtime.prompts import BUNDLED_BENCH, read_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts")
    ap.add_argument("--drafter", default="eagle")
    ap.add_argument("--tree", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    gen = SpeculativeGenerator.from_artifacts(args.artifacts, args.backend, args.device, drafter=args.drafter)
    prompts = [gen.encode(p) for p in read_prompts(BUNDLED_BENCH, args.prompts)]
    for p in prompts[:2]:  # warm-up: buckets, CUDA graphs
        gen.generate(p, max_new_tokens=args.tokens, tree=args.tree)
    steps, split = 0, {"draft": 0.0, "verify": 0.0, "host": 0.0}
    for p in prompts:
        stats = gen.generate(p, max_new_tokens=args.tokens, tree=args.tree).stats
        steps += stats["steps"]
        for key in split:
            split[key] += stats["time_s"][key]
    print("ms per step: " + ", ".join(f"{k} {v / steps * 1e3:.3f}" for k, v in split.items()) + f" ({steps} steps)")
    profile = cProfile.Profile()
    profile.enable()
    for p in prompts:
        gen.generate(p, max_new_tokens=args.tokens, tree=args.tree)
    profile.disable()
    print(f"under cProfile, totals over the same {steps} steps:")
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()

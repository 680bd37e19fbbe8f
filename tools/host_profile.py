"""Where a batch-1 speculative generation's host time goes on the torch backend (issue 15: the test's
EAGLE draft took 0.70 ms a step on an H100 where its captured graph replays in 0.35).

    python3 tools/host_profile.py ARTIFACTS [--drafter eagle] [--tree eagle2-d5-k6-n32] [--prompts 8]
        [--tokens 256] [--out PROFILE]

Generates the bench prompts one at a time (after one warm-up generation: captures and compiles are
not counted) under cProfile and prints the functions with the most own time and the most time under
them; --out keeps the pstats file. cProfile slows Python by a constant factor per call, so read the
shares, not the absolute times.
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
    ap.add_argument("--tree", default="eagle2-d5-k6-n32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", help="write the pstats file here")
    args = ap.parse_args()
    gen = SpeculativeGenerator.from_artifacts(args.artifacts, backend="torch", device=args.device, drafter=args.drafter)
    prompts = read_prompts(BUNDLED_BENCH)[:args.prompts]
    gen.generate(prompts[0], max_new_tokens=args.tokens, tree=args.tree)  # warm-up: captures, compiles
    profile = cProfile.Profile()
    steps = 0
    profile.enable()
    for prompt in prompts:
        steps += gen.generate(prompt, max_new_tokens=args.tokens, tree=args.tree).stats["steps"]
    profile.disable()
    print(f"{len(prompts)} prompts, {steps} steps")
    stats = pstats.Stats(profile).strip_dirs()
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    if args.out:
        stats.dump_stats(args.out)


if __name__ == "__main__":
    main()

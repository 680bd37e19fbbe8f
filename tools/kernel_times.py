"""Per-kernel GPU time of the fused step at several widths, to see which kernel makes a wide step dear.

    python3 tools/kernel_times.py [--kind triton] [--widths 1x32,1x48,1x64,8x8] [--json OUT]

On an H100 the Triton step costs 0.82 ms at 32 rows and 1.11 at 48 (bench/h100-2026-12-08/gemm_wide_curve.json),
and other tiles for the wide steps' GEMMs did not remove the jump (gemm_wide.json). This replays each
step's CUDA graph under torch.profiler (a random SmolLM2-135M-shaped model, tools/gemm_tune.py's) and
sums each kernel name's device time per step: the kernel whose time jumps with the width is the one to
rework. With programmatic dependent launch kernels overlap, so the sums can exceed the step's time.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from gemm_tune import smollm2_shaped, step_inputs  # tools/ is the script's folder, hence on sys.path
from graph_timing import captured

from treespec.models.fused_decoder import FusedDecoder
from treespec.models.tree_model import TreeDecoder

REPS = 20


def kernel_us(fused: FusedDecoder, inputs) -> dict[str, float]:
    """Microseconds per step by kernel name (the name's first 60 characters), from graph replays."""
    with torch.no_grad():
        graph = captured(lambda: fused(*inputs))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(REPS):
                graph.replay()
            torch.cuda.synchronize()
    sums: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            sums[event.name[:60]] += event.device_time / REPS
    return dict(sorted(sums.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="triton", choices=["triton", "cublas"])
    ap.add_argument("--widths", default="1x32,1x48,1x64,8x8", help="BATCHxTOKENS, comma-separated")
    ap.add_argument("--json")
    args = ap.parse_args()
    decoder = TreeDecoder(smollm2_shaped())
    fused = FusedDecoder(decoder, args.kind)
    result = {"device": torch.cuda.get_device_name(), "kind": args.kind, "us_per_step": {}}
    for width in args.widths.split(","):
        batch, tokens = (int(v) for v in width.split("x"))
        times = kernel_us(fused, step_inputs(decoder, batch, tokens))
        result["us_per_step"][width] = {k: round(v, 1) for k, v in times.items()}
        print(f"B{batch} T{tokens}: sum {sum(times.values()):.1f} us", flush=True)
        for name, us in list(times.items())[:8]:
            print(f"  {us:8.1f}  {name}", flush=True)
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()

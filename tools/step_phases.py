"""Where a torch-backend step's wall time goes besides the GPU's kernels (issue 16).

    python3 tools/step_phases.py [--reps 50]

On an H100 the step profile's whole step (host packing, graph replay, argmax to the host) took
1.17 ms at 64 tokens while the same step's CUDA graph, replayed back to back, took 0.92 ms. This
times, on a random SmolLM2-135M-shaped model (tools/gemm_tune.py's), the phases of
TorchBackend.step at T = 1 (bucket 1) and 64: packing the inputs on the host, the H2D copy and
graph launch as the CPU sees them, the GPU time between events around the replay, and the wait for
the argmax on the host; and the graph replayed back to back. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from gemm_tune import smollm2_shaped  # tools/ is the script's folder, hence on sys.path

from treespec.runtime.backends.base import StepInputs
from treespec.runtime.backends.torch_backend import TorchBackend
from treespec.runtime.trees.tree import batch_tree_inputs, chain_tree


def phases(backend: TorchBackend, tokens: int, reps: int) -> dict:
    rng = np.random.default_rng(tokens)
    ids = rng.integers(10, 20000, (1, tokens))
    mask = np.tril(np.ones((tokens, tokens), dtype=bool))[None]
    times: dict[str, list[float]] = {k: [] for k in ("pack", "replay_call", "gpu", "argmax_wait", "whole_step")}
    for i in range(reps + 3):
        inputs = StepInputs(ids, backend.lengths[:, None] + np.arange(tokens)[None], mask)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        backend.step(inputs)
        torch.cuda.synchronize()
        whole = time.perf_counter() - t0
        g = backend._graph_for(1, max(tokens, backend.min_bucket))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        backend._pack(g, inputs, g.tokens)
        t1 = time.perf_counter()
        start.record()
        g.graph.replay()
        end.record()
        t2 = time.perf_counter()
        g.outputs[2][:, :tokens].cpu()
        t3 = time.perf_counter()
        if i >= 3:
            for key, value in zip(times, (t1 - t0, t2 - t1, start.elapsed_time(end) / 1e3, t3 - t2, whole)):
                times[key].append(value)
    out = {k: round(statistics.median(v) * 1e3, 4) for k, v in times.items()}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.graph.replay()
    end.record()
    torch.cuda.synchronize()
    out["back_to_back_replay"] = round(start.elapsed_time(end) / reps, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    model = smollm2_shaped()
    result = {"device": torch.cuda.get_device_name(), "ms": {}}
    for tokens, min_bucket in ((1, 1), (64, 64)):
        backend = TorchBackend(model, "cuda", min_bucket=min_bucket)
        backend.reset(1, 512)
        prompt = np.random.default_rng(0).integers(10, 20000, 256).tolist()
        out = backend.step(StepInputs(*batch_tree_inputs([chain_tree(prompt)], backend.lengths)))
        backend.commit(out, [list(range(len(prompt)))])
        result["ms"][f"T{tokens}"] = phases(backend, tokens, args.reps)
        backend.close()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

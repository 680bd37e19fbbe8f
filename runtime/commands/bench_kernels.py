"""`treespec bench`'s per-step measurements: the verify-latency curves (ms per target step for T = 1...128
tree tokens, any backend) and the step profile: kernels per target step (torch.profiler's count) and ms
per step for the torch backend unfused and fused (cuBLAS or Triton GEMMs; issue 16).

Why: a SmolLM2 step on the H200 was ~1,200 small kernels (2.9-3.6 ms) for weights that need
0.06 ms to read, so the kernel count is the number to watch next to the time. Kernels are counted
on one eager step (the CUDA graph replays the same launches; memcpy/memset are not kernels); the
time is the wall time of a whole backend step as the generator sees it (host packing, graph
replay, the argmax copy), median of `reps`, after a past of `past` committed tokens.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter

import numpy as np
import torch
from torch.autograd import DeviceType

from treespec.runtime.backends.base import StepInputs
from treespec.runtime.backends.torch_backend import TorchBackend
from treespec.runtime.trees.tree import batch_tree_inputs, chain_tree

SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def tree_step(rng: np.random.Generator, tokens: int, lengths: np.ndarray) -> StepInputs:
    """A random tree of `tokens` nodes (each node's parent drawn among the earlier ones)."""
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, tokens)]
    mask = np.zeros((1, tokens, tokens), dtype=bool)
    for i in range(tokens):
        j = i
        while j >= 0:
            mask[0, i, j] = True
            j = parents[j]
    pos = lengths[:, None] + mask.sum(-1) - 1
    return StepInputs(rng.integers(10, 1000, (1, tokens)), pos.astype(np.int64), mask)


def _prefill(backend: TorchBackend, rng: np.random.Generator, past: int, capacity: int) -> None:
    backend.reset(1, capacity)
    ids, pos, mask = batch_tree_inputs([chain_tree(rng.integers(10, 1000, past).tolist())], backend.lengths)
    backend.commit(backend.step(StepInputs(ids, pos, mask)), [list(range(past))])


def count_kernels(backend: TorchBackend, inputs: StepInputs) -> tuple[Counter, Counter]:
    """CUDA kernels launched by one eager step (no graph), by name, counted by torch.profiler, and
    their summed device time in µs by name (what a fusion would save)."""
    graphs, backend.use_graphs = backend.use_graphs, False
    backend.step(inputs)  # warm-up: Triton compiles, cuBLAS picks its kernels
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        backend.step(inputs)
        torch.cuda.synchronize()
    backend.use_graphs = graphs
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    micros: Counter = Counter()
    for e in kernels:
        micros[e.name[:80]] += getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
    return Counter(e.name[:80] for e in kernels), micros


def time_step(backend: TorchBackend, inputs: StepInputs, reps: int) -> float:
    """Median ms of one whole step (host packing, replay, argmax copy)."""
    times = []
    for i in range(reps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        backend.step(inputs)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 4)


def profile_backend(decoder, fused: bool | str, sizes=SIZES, reps: int = 20, past: int = 256) -> dict:
    """{"kernels": {T: n}, "ms": {T: ms}} for one torch backend over `decoder` on CUDA."""
    backend = TorchBackend(decoder, "cuda", fused=fused)
    rng = np.random.default_rng(0)
    _prefill(backend, rng, past, past + max(sizes) + 8)
    row: dict = {"kernels": {}, "ms": {}, "min_bucket": backend.min_bucket}
    for t in sizes:
        inputs = tree_step(rng, t, backend.lengths)
        names, micros = count_kernels(backend, inputs)
        row["kernels"][str(t)] = sum(names.values())
        row.setdefault("kernel_us", {})[str(t)] = round(sum(micros.values()), 1)
        if t in (1, 64):
            row[f"kernel_us_by_name_t{t}"] = {n: round(us, 1) for n, us in micros.most_common(12)}
            row[f"kernel_names_t{t}"] = dict(names.most_common(12))
        row["ms"][str(t)] = time_step(backend, inputs, reps)
    padded, backend.min_bucket = backend.min_bucket, 1  # plain decoding unpadded (not bit-identical)
    row["ms_1_token_bucket"] = time_step(backend, tree_step(rng, 1, backend.lengths), reps)
    backend.min_bucket = padded
    backend.close()
    return row


def step_profile(decoder, device: str, reps: int = 20) -> dict:
    """The profile of the torch backend unfused, fused with cuBLAS GEMMs, with Triton GEMMs and
    with either by step width (auto, the default) ({} off CUDA: nothing to count)."""
    if device != "cuda":
        return {}
    out = {}
    for name, fused in (("torch", False), ("torch-fused", True), ("torch-fused-triton-gemm", "triton"),
                        ("torch-fused-auto", "auto")):
        try:
            out[name] = profile_backend(decoder, fused, reps=reps)
        except Exception as exc:  # report and keep the rest of the bench
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print_profile(out)
    return out


def print_profile(profile: dict) -> None:
    """Kernels and ms per step, one column per T."""
    sizes = [str(t) for t in SIZES]
    print(f"{'step profile, T =':>31} " + " ".join(f"{t:>7}" for t in sizes))
    for name, row in profile.items():
        if "error" in row:
            print(f"{name}: {row['error']}")
            continue
        print(f"{name:>23} kernels " + " ".join(f"{row['kernels'].get(t, ''):>7}" for t in sizes))
        print(f"{name:>23} ms      " + " ".join(f"{row['ms'].get(t, ''):>7}" for t in sizes)
              + f"   (1 token, bucket 1: {row.get('ms_1_token_bucket')} ms)")
        print(f"{name:>23} kern µs " + " ".join(f"{row.get('kernel_us', {}).get(t, ''):>7}" for t in sizes))
        for t in ("1", "64"):
            by_name = row.get(f"kernel_us_by_name_t{t}", {})
            print(f"{'':>23} T={t}: " + ", ".join(f"{n[:40]} {us}" for n, us in list(by_name.items())[:8]))


def verify_curve(backend, sizes, reps: int, device: str, past: int = 256) -> dict:
    """Wall time of one target step (host packing + launch/replay + argmax copy) per tree size."""
    backend.reset(1, past + max(sizes) + 8)
    rng = np.random.default_rng(0)
    ids, pos, mask = batch_tree_inputs([chain_tree(rng.integers(10, 1000, past).tolist())], backend.lengths)
    backend.commit(backend.step(StepInputs(ids, pos, mask)), [list(range(past))])
    curve = {}
    for t in sizes:
        if t > backend.capacity - past:
            break
        tree = chain_tree(rng.integers(10, 1000, t).tolist())
        inputs = StepInputs(*batch_tree_inputs([tree], backend.lengths))
        times = []
        for i in range(reps + 2):
            sync(device)
            start = time.perf_counter()
            out = backend.step(inputs)
            if out.argmax is None:
                np.asarray(out.logits)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        curve[str(t)] = round(statistics.median(times) * 1e3, 4)
    return curve


def curves(result, backend_name, target, manifest, device, args) -> None:
    """The verify curve as the generator sees it, then (CUDA) with exact-size buckets, and for the
    torch backend eagerly too: what the padding and the CUDA graphs each cost or save."""
    sizes = [s for s in SIZES if s <= manifest.profile("target").tree_tokens[2]]
    curves = result["verify_curve_ms"]
    graphs = device == "cuda" and (getattr(target, "use_graphs", False) or getattr(target, "cuda_graphs", False))
    if device == "cuda" and getattr(target, "gemm_choice", None) == "auto":  # the Triton kind's curve first
        target.pinned_kind = "triton"
        target.plan(1)
        curves[f"{backend_name}-cuda-graphs-triton-gemms"] = verify_curve(target, sizes, args.curve_reps, device)
        target.pinned_kind = None
    target.plan(1 << 30)  # the wide kind: padded steps (the default's, before any generation plans)
    curves[f"{backend_name}-cuda-graphs" if graphs else backend_name] = verify_curve(
        target, sizes, args.curve_reps, device)
    if device != "cuda" or target.min_bucket == 1:
        return
    padded, target.min_bucket = target.min_bucket, 1
    curves[f"{backend_name}{'-cuda-graphs' if graphs else ''}-exact-buckets"] = verify_curve(
        target, sizes, args.curve_reps, device)
    target.min_bucket = padded
    if backend_name == "torch":
        result["step_profile"] = step_profile(target.decoder, device)  # kernels and ms per step, fused or not
        eager = TorchBackend(target.decoder, device, min_bucket=1, use_graphs=False)
        curves["torch-eager-exact-buckets"] = verify_curve(eager, sizes, 5, device)
        eager.close()

"""Benchmark (not a test): tree-attention kernel vs SDPA with a dense boolean mask vs FlexAttention.

    python plugins/gpu/bench_kernel.py --out DIR [--deadline SECONDS]

fp16, B=1, past length P (cache full) in {512, 2048, 8192}, tree tokens T in {16, 64, 128}, for
SmolLM2 heads (H=9, KVH=3, D=64) and a Llama-like shape (H=32, KVH=8, D=128). Times are GPU times
per call from CUDA graphs (no host launch overhead, as under TensorRT with CUDA graphs) that call
the op on one of several caches in turn, 3x the L2 in total, so every call reads its cache from
HBM like each layer of a real model does; `warm` repeats one cache (L2-resident when it fits).
Ours: the Triton launcher over a few tile configs with the
single-launch kernel (splits=1, what TensorRT runs) and the split-KV path, the launcher's
default choice, and the AOT PTX launched through the CUDA driver (the TensorRT path) for each
plugin tactic. SDPA gets K/V already concatenated and a precomputed [1,1,T,P+T] mask (the
concatenation is not timed); its faster variant of enable_gqa=True and pre-repeated K/V counts.
Bandwidth: bytes the op must move (q, new K/V, the P cache rows, mask, output) / time, against
a measured device-to-device copy (2 x bytes / time). Writes bench_kernel.json and .png.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from triton.testing import do_bench

from treespec.plugins.tree_attention import aot
from treespec.plugins.tree_attention.check import random_tree_mask
from treespec.plugins.tree_attention.config import TACTICS, KernelConfig, tactic_config
from treespec.plugins.tree_attention.cuda_launch import PtxKernel
from treespec.plugins.tree_attention.kernel import tree_attention

SHAPES = {"smollm2 (H9/KVH3/D64)": (9, 3, 64), "llama-like (H32/KVH8/D128)": (32, 8, 128)}
PASTS = (512, 2048, 8192)
TOKENS = (16, 64, 128)
CONFIGS = {
    64: [KernelConfig(16, 64, 4, 3), KernelConfig(32, 64, 4, 3), KernelConfig(64, 64, 4, 3),
         KernelConfig(64, 64, 4, 2), KernelConfig(128, 64, 8, 2)],
    128: [KernelConfig(16, 64, 4, 3), KernelConfig(32, 64, 4, 3), KernelConfig(64, 64, 4, 2),
          KernelConfig(64, 32, 4, 3), KernelConfig(128, 32, 8, 2)],
}


L2_BYTES = 50 << 20  # H100


def _replay_ms(graph, n: int = 5) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[n // 2]


def bench(fn, copies: int, cold: bool = True) -> float:
    """GPU milliseconds per call of fn(i), from a CUDA graph of calls on copy i = 0, 1, ... of the
    cache: every call finds its cache cold in L2, like each layer of a model. cold=False: copy 0."""
    calls = max(copies, 16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile / warm up outside the capture
        fn(0)
        fn(copies - 1)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies if cold else 0)
    return _replay_ms(graph) / calls


def copy_bandwidth() -> float:
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = float(do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median"))
    return 2 * src.numel() * 2 / (ms * 1e-3)


def useful_bytes(h: int, kvh: int, d: int, p: int, t: int) -> int:
    return 2 * (2 * h * t * d + 2 * kvh * t * d + 2 * kvh * p * d) + 4 * t * t + 4


def inputs(h: int, kvh: int, d: int, p: int, t: int) -> dict:
    """One q/new K,V/mask and `copies` caches whose total is 3x the L2 (one per 'layer')."""
    g = torch.Generator(device="cuda").manual_seed(p * 1000 + t)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").half()  # noqa: E731
    mask = random_tree_mask(1, t, torch.Generator().manual_seed(t)).cuda()
    copies = min(256, max(4, math.ceil(3 * L2_BYTES / (2 * kvh * p * d * 2))))
    return dict(q=r(1, h, t, d), k_new=r(1, kvh, t, d), v_new=r(1, kvh, t, d),
                past_k=[r(1, kvh, p, d) for _ in range(copies)], past_v=[r(1, kvh, p, d) for _ in range(copies)],
                past_lengths=torch.full((1,), p, dtype=torch.int32, device="cuda"),
                tree_mask=mask.to(torch.int32), mask_bool=mask, copies=copies)


def kernel_args(x: dict, i: int) -> list:
    return [x["past_k"][i] if k == "past_k" else x["past_v"][i] if k == "past_v" else x[k] for k in aot.KERNEL_INPUTS]


SPLITS = (1, 2, 4, 8, 16, 32, 64)


def bench_ours(x: dict, d: int) -> tuple[list[dict], torch.Tensor]:
    n, capacity = x["copies"], x["past_k"][0].shape[2]
    args = [kernel_args(x, i) for i in range(n)]
    rows = []
    for cfg in CONFIGS[d]:
        for splits in SPLITS:
            if splits > 1 and capacity // splits < cfg.block_n:
                continue
            ms = bench(lambda i: tree_attention(*args[i], config=cfg, splits=splits), n)
            rows.append({"config": cfg.__dict__, "splits": splits, "ms": ms})
    best = min(rows, key=lambda r: r["ms"])
    cfg = KernelConfig(**best["config"])
    best["warm_ms"] = bench(lambda i: tree_attention(*args[i], config=cfg, splits=best["splits"]), n, cold=False)
    rows.append({"config": "default", "splits": "default", "ms": bench(lambda i: tree_attention(*args[i]), n)})
    return rows, tree_attention(*args[0])


def bench_aot(x: dict, kernels: dict) -> list[dict]:
    n = x["copies"]
    out = torch.empty_like(x["q"])
    rows = []
    for tactic, (kernel, launcher) in kernels.items():
        plan = aot.plan_launch(kernel, [tuple(t.shape) for t in kernel_args(x, 0)])
        ptrs = [[t.data_ptr() for t in kernel_args(x, i)] for i in range(n)]
        ms = bench(lambda i: launcher.launch(plan, ptrs[i], [out.data_ptr()], torch.cuda.current_stream().cuda_stream), n)
        rows.append({"tactic": tactic, "config": kernel.config.__dict__, "shared_mem": kernel.shared_mem, "ms": ms})
    return rows


def joined_kv(x: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    keys = [torch.cat([k, x["k_new"]], dim=2) for k in x["past_k"]]
    values = [torch.cat([v, x["v_new"]], dim=2) for v in x["past_v"]]
    return keys, values


def bench_sdpa(x: dict, p: int, t: int) -> tuple[dict, torch.Tensor | None]:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    keys, values = joined_kv(x)
    mask = torch.cat([torch.ones(1, t, p, dtype=torch.bool, device="cuda"), x["mask_bool"]], dim=-1)[:, None]
    groups = x["q"].shape[1] // keys[0].shape[1]
    res: dict = {}
    out = sdpa(x["q"], keys[0], values[0], attn_mask=mask, enable_gqa=True)
    try:
        res["gqa"] = bench(lambda i: sdpa(x["q"], keys[i], values[i], attn_mask=mask, enable_gqa=True), x["copies"])
    except Exception as exc:  # a backend may refuse a combination
        res["gqa"] = f"{type(exc).__name__}: {exc}"[:200]
    try:
        rk = [k.repeat_interleave(groups, 1) for k in keys]
        rv = [v.repeat_interleave(groups, 1) for v in values]
        res["repeated_kv"] = bench(lambda i: sdpa(x["q"], rk[i], rv[i], attn_mask=mask), x["copies"])
        del rk, rv
    except Exception as exc:
        res["repeated_kv"] = f"{type(exc).__name__}: {exc}"[:200]
    return res, out


def bench_flex(x: dict, p: int, t: int, flex) -> float | str:
    from torch.nn.attention.flex_attention import create_block_mask

    tree = x["mask_bool"][0]

    def mask_mod(b, h, q_idx, kv_idx):
        j = (kv_idx - p).clamp(0, t - 1)
        return (kv_idx < p) | ((kv_idx >= p) & tree[q_idx.clamp(0, t - 1), j])

    keys, values = joined_kv(x)
    block_mask = create_block_mask(mask_mod, None, None, t, p + t, device="cuda")
    fn = lambda i: flex(x["q"], keys[i], values[i], block_mask=block_mask, enable_gqa=True)  # noqa: E731
    fn(0)
    return bench(fn, x["copies"])


def plot(results: list[dict], copy_bw: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SHAPES), figsize=(7 * len(SHAPES), 8), squeeze=False)
    for col, shape in enumerate(SHAPES):
        pts = sorted((r for r in results if r["shape"] == shape), key=lambda r: (r["T"], r["P"]))
        labels = [f"T{r['T']}\nP{r['P']}" for r in pts]
        xs = range(len(pts))
        for k, (key, name) in enumerate((("ours_ms", "ours (best)"), ("aot_ms", "AOT PTX (TensorRT path)"),
                                         ("sdpa_ms", "SDPA + bool mask"), ("flex_ms", "FlexAttention"))):
            vals = [r.get(key) if isinstance(r.get(key), float) else float("nan") for r in pts]
            axes[0][col].bar([i + 0.2 * k - 0.3 for i in xs], [v * 1e3 for v in vals], 0.2, label=name)
        axes[0][col].set_xticks(list(xs), labels, fontsize=7)
        axes[0][col].set_ylabel("µs per call (CUDA graph, cold L2)")
        axes[0][col].set_yscale("log")
        axes[0][col].set_title(shape)
        axes[0][col].legend(fontsize=7)
        axes[1][col].bar(list(xs), [100 * r["bw_fraction"] for r in pts])
        axes[1][col].axhline(70, color="red", linestyle="--", linewidth=1)
        axes[1][col].set_xticks(list(xs), labels, fontsize=7)
        axes[1][col].set_ylabel(f"% of copy bandwidth ({copy_bw / 1e12:.2f} TB/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _compiled_flex(report: dict):
    """flex_attention compiled once per benchmark shape, or None (the reason goes in the report)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        for knob in ("cache_size_limit", "recompile_limit"):  # one compile per benchmark shape
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        return flex
    except Exception as exc:
        report["flex_error"] = str(exc)[:300]
        return None


def _aot_kernels_for(d: int) -> dict:
    kernels = {}
    for tactic in TACTICS:
        kernel = aot.fit_shared_memory("fp16", d, None, tactic_config(tactic))
        kernels[tactic] = (kernel, PtxKernel(kernel, driver="ctypes"))
    return kernels


def _measure_point(shape: str, p: int, t: int, aot_kernels: dict, copy_bw: float) -> tuple[dict, dict]:
    """Ours (sweep), AOT PTX and SDPA at one (shape, P, T); returns the point and its inputs."""
    h, kvh, d = SHAPES[shape]
    x = inputs(h, kvh, d, p, t)
    ours, out = bench_ours(x, d)
    aot_rows = bench_aot(x, aot_kernels)
    sdpa, sdpa_out = bench_sdpa(x, p, t)
    best = min(ours[:-1], key=lambda r: r["ms"])  # the sweep's best (its warm time is measured)
    fused = min((r for r in ours if r["splits"] == 1), key=lambda r: r["ms"])
    sdpa_ms = min((v for v in sdpa.values() if isinstance(v, float)), default=float("nan"))
    nbytes = useful_bytes(h, kvh, d, p, t)
    point: dict = {"shape": shape, "H": h, "KVH": kvh, "D": d, "P": p, "T": t, "ours": ours, "aot": aot_rows,
                   "sdpa": sdpa, "copies": x["copies"]}
    point.update(ours_ms=best["ms"], ours_best=best, fused_ms=fused["ms"], default_ms=ours[-1]["ms"],
                 aot_ms=min(r["ms"] for r in aot_rows), sdpa_ms=sdpa_ms, bytes=nbytes,
                 bandwidth_Bps=nbytes / (best["ms"] * 1e-3), bw_fraction=nbytes / (best["ms"] * 1e-3) / copy_bw,
                 speedup_vs_sdpa=sdpa_ms / best["ms"],
                 max_abs_diff_vs_sdpa=(out.float() - sdpa_out.float()).abs().max().item() if sdpa_out is not None else None)
    return point, x


def _print_point(point: dict) -> None:
    best, flex_ms = point["ours_best"], point.get("flex_ms")
    flex_us = flex_ms * 1e3 if isinstance(flex_ms, float) else float("nan")
    print(f"{point['shape']:28s} P={point['P']:5d} T={point['T']:3d}  ours {best['ms'] * 1e3:7.1f} µs "
          f"({best['config']}, splits {best['splits']})  fused {point['fused_ms'] * 1e3:7.1f}  default "
          f"{point['default_ms'] * 1e3:7.1f}  aot {point['aot_ms'] * 1e3:7.1f}  sdpa {point['sdpa_ms'] * 1e3:7.1f}"
          f"  flex {flex_us:7.1f}  warm {best['warm_ms'] * 1e3:6.1f}  bw {100 * point['bw_fraction']:5.1f}%"
          f"  x{point['speedup_vs_sdpa']:.2f} vs sdpa", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=300.0, help="stop starting new points after this")
    parser.add_argument("--flex-budget", type=float, default=120.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    report: dict = {"device": device, "torch": torch.__version__, "copy_bandwidth_Bps": copy_bw, "points": []}
    print(f"{device}: device copy bandwidth {copy_bw / 1e12:.3f} TB/s", flush=True)
    flex, flex_spent = _compiled_flex(report), 0.0
    order = [(s, 8192, 64) for s in SHAPES]  # the target point first, for both shapes
    order += [(s, p, t) for s in SHAPES for p in PASTS for t in TOKENS if (p, t) != (8192, 64)]
    aot_kernels: dict = {}
    for shape, p, t in order:
        if time.time() - start > args.deadline:
            report.setdefault("skipped", []).append([shape, p, t])
            continue
        d = SHAPES[shape][2]
        if d not in aot_kernels:
            aot_kernels[d] = _aot_kernels_for(d)
        point, x = _measure_point(shape, p, t, aot_kernels[d], copy_bw)
        if flex is not None and flex_spent < args.flex_budget:
            t0 = time.time()
            try:
                point["flex_ms"] = bench_flex(x, p, t, flex)
            except Exception as exc:
                point["flex_ms"] = f"{type(exc).__name__}: {exc}"[:300]
            flex_spent += time.time() - t0
        if isinstance(point.get("flex_ms"), float):
            point["speedup_vs_flex"] = point["flex_ms"] / point["ours_ms"]
        report["points"].append(point)
        _print_point(point)
        (args.out / "bench_kernel.json").write_text(json.dumps(report, indent=1, default=str))
        del x
    report["elapsed_s"] = time.time() - start
    (args.out / "bench_kernel.json").write_text(json.dumps(report, indent=1, default=str))
    plot(report["points"], copy_bw, args.out / "bench_kernel.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

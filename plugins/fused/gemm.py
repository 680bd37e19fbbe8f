"""Triton GEMMs with their neighbours fused in, for the fused step's `gemm="triton"` mode: a decoder
layer is five kernels (treespec.models.fused_decoder.FusedDecoder):

  1. residual add + RMSNorm + QKV GEMM + RoPE + K/V cache write (layer 0: the embedding gather instead
     of the add), 2. ordered tree attention, 3. o_proj GEMM, 4. residual add + RMSNorm + gate/up GEMM
     + SiLU*mul, 5. down GEMM.

Why: a SmolLM2 step costs the latency of its small dependent kernels, not its bytes (270 MB of weights
need 0.06 ms). cuBLAS cannot take a prologue, so with it a layer is nine kernels. Here a GEMM
whose output feeds the residual stream (o_proj, down) writes fp32 partial sums [SPLIT_K, M, N] (split K
spreads SmolLM2's narrow projections over more SMs) and the next kernel adds them, in split order, while
it loads its input: no reduction kernel, no atomics, the result fixed by the launch alone.

Each program holds its whole K range in one tile (BLOCK_K = K / SPLIT_K rounded up to a power of two),
so it reads its weight tile before it waits for the previous kernel: launched with programmatic
dependent launch (PDL, Hopper and newer), a kernel's weight reads overlap the kernel before it.

Bit-identity across steps: a row's result depends only on that row and the launch (tile shapes and
splits fixed per GEMM, never per step shape), so a row computes the same bits in a 1-token step, a
padded step, a tree step or a batch of requests. Must stay in a .py file (Triton's interpreter).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from treespec.plugins.pdl import pdl_launch
from treespec.plugins.tree_attention.kernel import dot_precision

EPI_PARTIAL, EPI_SILU_MUL, EPI_QKV_ROPE = 0, 1, 2


@dataclass(frozen=True)
class GemmLaunch:
    """Tiles of one GEMM. Process-wide, like the attention's launch: they fix the bits."""

    block_m: int = 16
    block_n: int = 32
    split_k: int = 1
    num_warps: int = 4

    def k_extent(self, k: int, split: int) -> int:
        """The K range of one split: one tile, a power of two."""
        return triton.next_power_of_2(triton.cdiv(k, split))

    def splits(self, k: int) -> int:
        """SPLIT_K for a reduction of length k: at most split_k, none of them empty (a tiny model's K)."""
        split = self.split_k
        while split > 1 and self.k_extent(k, split) * (split - 1) >= k:
            split -= 1
        return split


# Per GEMM of a layer. Picked by tools/gemm_tune.py on an H100 (bench/h100-2026-12-07-night/): a
# 1-token step 0.70 ms with these and PDL, 0.95 ms without PDL, 0.85 ms with cuBLAS GEMMs; at 64 rows
# 1.15 ms against cuBLAS's 0.92 (which is why gemm="auto" takes cuBLAS there). Tried and removed: a
# loop over K slices with 64-row tiles (to read each weight once at 64 rows), 1.48 ms at 64 rows;
# Triton QKV and gate/up with cuBLAS o_proj and down, 1.28 ms; other row/column blocks and warps for steps
# of more than 32 rows only (same K tiles and splits: every candidate's rows stayed bitwise those of the
# narrow launches), at best 1182 -> 1132 us at 64 rows and 1897 -> 1760 at 128, still above cuBLAS's 912
# and 1165 (bench/h100-2026-12-08/gemm_wide.json): the wide steps' cost is not the number of programs. TREESPEC_FUSED_GEMMS="qkv=16,32,1,8;o=...;gate_up=...;down=..."
# (BLOCK_M,BLOCK_N,SPLIT_K,warps) overrides any of them for experiments.
DEFAULT_LAUNCHES = {"qkv": GemmLaunch(16, 32, 1, 8), "o": GemmLaunch(64, 32, 3, 8),
                    "gate_up": GemmLaunch(16, 32, 1, 8), "down": GemmLaunch(16, 32, 2, 4)}


def parse_launches(text: str) -> dict[str, GemmLaunch]:
    rule = (f"TREESPEC_FUSED_GEMMS={text!r}: want 'name=BLOCK_M,BLOCK_N,SPLIT_K,warps;...' with names from "
            f"{sorted(DEFAULT_LAUNCHES)}, blocks powers of two in 16..128, SPLIT_K 1..16, warps 1, 2, 4 or 8")
    launches = dict(DEFAULT_LAUNCHES)
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, _, values = item.partition("=")
        try:
            block_m, block_n, split_k, warps = (int(v) for v in values.split(","))
        except ValueError:
            raise ValueError(rule) from None
        blocks_ok = all(b & (b - 1) == 0 and 16 <= b <= 128 for b in (block_m, block_n))
        if name not in launches or not blocks_ok or not 1 <= split_k <= 16 or warps not in (1, 2, 4, 8):
            raise ValueError(rule)
        launches[name] = GemmLaunch(block_m, block_n, split_k, warps)
    return launches


LAUNCHES = parse_launches(os.environ.get("TREESPEC_FUSED_GEMMS", ""))


@triton.jit
def _residual(H, IDS, DP, rm, rk, m_ok, k_ok, M, K, GATHER: tl.constexpr, SPLIT_IN: tl.constexpr):
    """Rows rm, columns rk of the residual stream: H (or the embedding rows of IDS) plus the previous
    GEMM's output, its SPLIT_IN fp32 partials summed in order and rounded to the dtype as HF rounds
    `residual + out`."""
    mask = m_ok[:, None] & k_ok[None, :]
    if GATHER:
        src = tl.load(IDS + rm, mask=m_ok, other=0).to(tl.int64)
    else:
        src = rm.to(tl.int64)
    h = tl.load(H + src[:, None] * K + rk[None, :], mask=mask, other=0.0)
    if SPLIT_IN > 0:
        d = tl.zeros(h.shape, dtype=tl.float32)
        for s in tl.static_range(SPLIT_IN):
            d += tl.load(DP + (s * M + rm[:, None]).to(tl.int64) * K + rk[None, :], mask=mask, other=0.0)
        h = (h.to(tl.float32) + d.to(h.dtype).to(tl.float32)).to(h.dtype)
    return h


@triton.jit
def fused_linear_kernel(X, IDS, DP, NORM_W, RES_OUT, W, WROT, BIAS, BIAS_ROT, OUT,
                        POS, LENGTHS, COS, SIN, KC, VC,
                        M, N, K, T, eps, skb, skh, skr, svb, svh, svr,
                        NORM: tl.constexpr, GATHER: tl.constexpr, SPLIT_IN: tl.constexpr, EPI: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HQ: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
                        DOT_PREC: tl.constexpr, PDL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # OUT = epilogue(input @ W[n].T): input is X [M, K], or with NORM RMSNorm(residual) * NORM_W where
    # the residual (see _residual) is also written to RES_OUT by the programs of column block 0.
    # Program (m, n, s): BLOCK_M rows, BLOCK_N columns, the K range of split s in one tile.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = tl.program_id(1) * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    rk = split * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok, n_ok, k_ok = rm < M, rn < N, rk < K
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # Weights first: they do not depend on the kernel before, whose end PDL lets this one overlap.
    w_offs = rn[None, :].to(tl.int64) * K + rk[:, None]  # [BLOCK_K, BLOCK_N]
    w_mask = n_ok[None, :] & k_ok[:, None]
    w = tl.load(W + w_offs, mask=w_mask, other=0.0)
    w2 = w
    if EPI == 1:  # gate rows [0, N), up rows [N, 2N)
        w2 = tl.load(W + N * K + w_offs, mask=w_mask, other=0.0)
    elif EPI == 2:  # rotate_half of the Q and K heads' rows; V heads (rows >= (HQ + KVH) * D) read nothing
        w2 = tl.load(WROT + w_offs, mask=w_mask & (rn < (HQ + KVH) * D)[None, :], other=0.0)
    if NORM:
        nw = tl.load(NORM_W + rk, mask=k_ok, other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if NORM:
        h = _residual(X, IDS, DP, rm, rk, m_ok, k_ok, M, K, GATHER, SPLIT_IN)
        if n0 == 0:
            tl.store(RES_OUT + rm[:, None].to(tl.int64) * K + rk[None, :], h, mask=m_ok[:, None] & k_ok[None, :])
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=1) / K + eps)
        x = ((hf * rstd[:, None]).to(h.dtype).to(tl.float32) * nw[None, :]).to(h.dtype)
    else:
        x = tl.load(X + rm[:, None].to(tl.int64) * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    acc = tl.dot(x, w, input_precision=DOT_PREC)
    acc2 = acc
    if EPI != 0:
        acc2 = tl.dot(x, w2, input_precision=DOT_PREC)
    _epilogue(acc, acc2, BIAS, BIAS_ROT, OUT, POS, LENGTHS, COS, SIN, KC, VC, rm, rn, n0, split, m_ok, n_ok, M, N, T,
              skb, skh, skr, svb, svh, svr, EPI, HAS_BIAS, HQ, KVH, D)


@triton.jit
def _epilogue(acc, acc2, BIAS, BIAS_ROT, OUT, POS, LENGTHS, COS, SIN, KC, VC, rm, rn, n0, split, m_ok, n_ok, M, N, T,
              skb, skh, skr, svb, svh, svr, EPI: tl.constexpr, HAS_BIAS: tl.constexpr, HQ: tl.constexpr,
              KVH: tl.constexpr, D: tl.constexpr):
    if EPI == 0:  # fp32 partials [SPLIT_K, M, N]; split 0 carries the bias
        if HAS_BIAS:
            if split == 0:
                acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        dst = OUT + (split * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
        tl.store(dst, acc, mask=m_ok[:, None] & n_ok[None, :])
    elif EPI == 1:
        _silu_mul_store(acc, acc2, BIAS, OUT, rm, rn, m_ok, n_ok, N, HAS_BIAS)
    else:
        _rope_store(acc, acc2, BIAS, BIAS_ROT, OUT, POS, LENGTHS, COS, SIN, KC, VC, rm, rn, n0, m_ok, T,
                    skb, skh, skr, svb, svh, svr, HAS_BIAS, HQ, KVH, D)


@triton.jit
def _silu_mul_store(gate, up, BIAS, OUT, rm, rn, m_ok, n_ok, N, HAS_BIAS: tl.constexpr):
    # OUT [M, N] = SiLU(gate) * up, each GEMM output and the SiLU rounded to the dtype as HF rounds them
    dtype = OUT.dtype.element_ty
    if HAS_BIAS:
        gate += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        up += tl.load(BIAS + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    g = gate.to(dtype).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(dtype).to(tl.float32)
    out = act * up.to(dtype).to(tl.float32)
    tl.store(OUT + rm[:, None].to(tl.int64) * N + rn[None, :], out.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _rope_store(acc, acc_rot, BIAS, BIAS_ROT, Q, POS, LENGTHS, COS, SIN, KC, VC, rm, rn, n0, m_ok, T,
                skb, skh, skr, svb, svh, svr, HAS_BIAS: tl.constexpr, HQ: tl.constexpr, KVH: tl.constexpr,
                D: tl.constexpr):
    # RoPE as q * cos + rotate_half(q) * sin (acc_rot is rotate_half of the output, exactly: negation
    # and a permutation of W's rows); Q goes to Q [M, HQ * D], K and V to their cache rows L_b + t.
    head = n0 // D
    col = rn - head * D
    if HAS_BIAS:
        acc += tl.load(BIAS + rn).to(tl.float32)[None, :]
        acc_rot += tl.load(BIAS_ROT + rn, mask=rn < (HQ + KVH) * D, other=0.0).to(tl.float32)[None, :]
    dtype = Q.dtype.element_ty
    y = acc.to(dtype).to(tl.float32)
    if head < HQ + KVH:
        pos = tl.load(POS + rm, mask=m_ok, other=0).to(tl.int64)
        trig = pos[:, None] * D + col[None, :]
        cos = tl.load(COS + trig, mask=m_ok[:, None], other=0.0)
        sin = tl.load(SIN + trig, mask=m_ok[:, None], other=0.0)
        y = y * cos + acc_rot.to(dtype).to(tl.float32) * sin
    b = (rm // T).to(tl.int64)
    row = tl.load(LENGTHS + b, mask=m_ok, other=0) + rm % T
    if head < HQ:
        tl.store(Q + rm[:, None].to(tl.int64) * (HQ * D) + rn[None, :], y.to(dtype), mask=m_ok[:, None])
    elif head < HQ + KVH:
        dst = KC + (b * skb + (head - HQ) * skh + row * skr)[:, None] + col[None, :]
        tl.store(dst, y.to(KC.dtype.element_ty), mask=m_ok[:, None])
    else:
        dst = VC + (b * svb + (head - HQ - KVH) * svh + row * svr)[:, None] + col[None, :]
        tl.store(dst, y.to(VC.dtype.element_ty), mask=m_ok[:, None])


def tiles_fit(weight: torch.Tensor) -> bool:
    """Whether these GEMMs can run on `weight`'s device and dtype: a program holds its whole K range,
    which in fp32 exceeds a GPU's shared memory at SmolLM2's K (320 KB asked, 227 KB on an H100);
    the CPU interpreter has no such limit (the fp32 tests)."""
    return weight.device.type != "cuda" or weight.element_size() <= 2


def rotated_rows(weight: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """The first `heads` heads of a [N, ...] projection with rotate_half applied to its output
    rows: x @ rotated.T == rotate_half(x @ weight[:heads * dim].T) per head."""
    w = weight[:heads * dim].reshape(heads, dim, *weight.shape[1:])
    half = dim // 2
    return torch.cat([-w[:, half:], w[:, :half]], 1).reshape(heads * dim, *weight.shape[1:]).contiguous()


@dataclass
class ResidualIn:
    """The input of a GEMM that starts with the residual add and RMSNorm: `residual` [M, K] (or the
    embedding table [V, K] with `ids` [M]) plus `partials` [S, M, K] fp32 (the last GEMM's output;
    None: nothing to add), normed with `norm_weight`; the sum is written to `residual_out` [M, K]
    (not `residual`: other programs still read it)."""

    residual: torch.Tensor
    partials: torch.Tensor | None
    norm_weight: torch.Tensor
    residual_out: torch.Tensor
    eps: float
    ids: torch.Tensor | None = None


@dataclass
class RopeOut:
    """Where the QKV GEMM's RoPE epilogue writes: Q [M, H * D], K/V cache rows L_b + t."""

    q: torch.Tensor
    rot: torch.Tensor  # rotated_rows(qkv, H + KVH, D)
    rot_bias: torch.Tensor | None
    pos: torch.Tensor  # [B, T]
    lengths: torch.Tensor  # [B]
    cos: torch.Tensor  # [positions, D] fp32
    sin: torch.Tensor
    k_cache: torch.Tensor  # [B, KVH, rows, D]
    v_cache: torch.Tensor
    tokens: int
    heads: int
    kv_heads: int


def fused_linear(x: torch.Tensor | ResidualIn, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                 launch: GemmLaunch, epilogue: int = EPI_PARTIAL, rope: RopeOut | None = None) -> None:
    """One fused GEMM into `out`: fp32 partials [SPLIT_K, M, N] (EPI_PARTIAL), SiLU(gate) * up [M, N]
    of a [2N, K] gate/up weight (EPI_SILU_MUL), or RoPE'd Q, K, V (EPI_QKV_ROPE, `out` = rope.q)."""
    norm = isinstance(x, ResidualIn)
    src = x.residual if norm else x
    rows = out.shape[-2] if epilogue != EPI_QKV_ROPE else rope.q.shape[0]
    k = weight.shape[1]
    cols = weight.shape[0] // 2 if epilogue == EPI_SILU_MUL else weight.shape[0]
    if not norm and (x.stride(1) != 1 or x.stride(0) != k) or not weight.is_contiguous():
        raise ValueError("fused_linear needs a contiguous [M, K] input and [N, K] weight")
    split = launch.splits(k)
    if (norm or epilogue != EPI_PARTIAL) and split != 1:
        raise ValueError("only a GEMM writing partials splits K")
    if epilogue == EPI_PARTIAL and out.shape[0] != split:
        raise ValueError(f"partials out holds {out.shape[0]} splits, the launch makes {split} for K = {k}")
    block_n = launch.block_n
    if epilogue == EPI_QKV_ROPE:  # a column block within one head (a small model's head may be narrower)
        block_n = min(block_n, rope.cos.shape[1])
        if rope.cos.shape[1] % block_n:
            raise ValueError(f"the QKV GEMM's column block ({block_n}) must divide the head dim")
    partials = x.partials if norm else None
    r = rope
    dummy = weight
    pdl = pdl_launch(out.device)
    grid = (triton.cdiv(rows, launch.block_m), triton.cdiv(cols, block_n), split)
    fused_linear_kernel[grid](
        src, x.ids if norm and x.ids is not None else dummy, partials if partials is not None else dummy,
        x.norm_weight if norm else dummy, x.residual_out if norm else dummy, weight,
        r.rot if r else dummy, bias if bias is not None else dummy,
        r.rot_bias if r and r.rot_bias is not None else dummy, out,
        r.pos if r else dummy, r.lengths if r else dummy, r.cos if r else dummy, r.sin if r else dummy,
        r.k_cache if r else dummy, r.v_cache if r else dummy,
        rows, cols, k, r.tokens if r else 1, x.eps if norm else 0.0,
        *(r.k_cache.stride()[:3] if r else (0, 0, 0)), *(r.v_cache.stride()[:3] if r else (0, 0, 0)),
        NORM=norm, GATHER=norm and x.ids is not None, SPLIT_IN=partials.shape[0] if partials is not None else 0,
        EPI=epilogue, HAS_BIAS=bias is not None, HQ=r.heads if r else 1, KVH=r.kv_heads if r else 1,
        D=r.cos.shape[1] if r else 16, DOT_PREC=dot_precision(src.dtype), PDL=bool(pdl),
        BLOCK_M=launch.block_m, BLOCK_N=block_n, BLOCK_K=launch.k_extent(k, split), num_warps=launch.num_warps,
        **pdl)


@dataclass(frozen=True)
class LoopLaunch:
    """Tiles of `rows_linear_kernel`, a GEMM that loops over K (fixed per process: it fixes the bits)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


# lm_head: a wide GEMM (49,152 x 576 for SmolLM2) of few rows, so a K loop whose loads pipeline. The
# default tiles won tools/gemm_tune.py --lm-head on an H100 (bench/h100-2026-12-07-2200/lm_head.json): a
# Triton step 705 us at 1 token and 828 at 32 (one K tile a program, 576 padded to 1024: 736 and 883);
# the EAGLE head's lm_head (8 rows of 16,384) 6.1 us (10.8).
LM_HEAD = LoopLaunch()


@triton.jit
def rows_linear_kernel(X, W, BIAS, OUT, M, N, K, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    rk = tl.arange(0, BLOCK_K)
    w_rows = W + rn[None, :].to(tl.int64) * K
    # the first weight tile is read before waiting for the kernel that writes X (PDL)
    w = tl.load(w_rows + rk[:, None], mask=n_ok[None, :] & (rk < K)[:, None], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x_rows = X + rm[:, None].to(tl.int64) * K
    x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
    acc = tl.dot(x, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), input_precision=DOT_PREC)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # in K order whatever M: a row's bits never depend on M
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: LoopLaunch) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias) -> [M, N] in x's dtype, looping over K."""
    rows, k = x.shape
    if x.stride(1) != 1 or x.stride(0) != k or not weight.is_contiguous():
        raise ValueError("rows_linear needs a contiguous [M, K] input and [N, K] weight")
    out = x.new_empty(rows, weight.shape[0])
    pdl = pdl_launch(x.device)
    grid = (triton.cdiv(rows, launch.block_m), triton.cdiv(weight.shape[0], launch.block_n))
    rows_linear_kernel[grid](x, weight, bias if bias is not None else weight, out, rows, weight.shape[0], k,
                             HAS_BIAS=bias is not None, DOT_PREC=dot_precision(x.dtype), PDL=bool(pdl),
                             BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k,
                             num_warps=launch.num_warps, num_stages=launch.num_stages, **pdl)
    return out


def lm_head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias) -> [M, N] in x's dtype, each row the same bits whatever M,
    unlike cuBLAS (which picks its kernel by shape)."""
    return rows_linear(x, weight, bias, LM_HEAD)

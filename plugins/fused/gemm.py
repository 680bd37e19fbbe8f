"""Triton GEMMs for the fused step, with epilogues: the option `gemm="triton"` of
treespec.models.fused_decoder (TorchBackend(fused="triton"), TREESPEC_TORCH_FUSED=triton).

Why: at a step's 64 rows cuBLAS may split K (a GEMM and a reduction kernel) for SmolLM2's narrow
projections (N = 576), and GEMM outputs are written only for the next element-wise kernel to read
them back. Here every GEMM is one kernel with no split of K; the QKV GEMM applies RoPE and writes
K/V to the cache (`qkv_rope`), gate/up applies SiLU*mul (`linear_silu_mul`): 7 kernels per layer
instead of 9. Which is faster on the H200 is for `treespec bench`'s step profile to say (not
measured when this was written).

Bit-identity across steps: each output element's K loop and tile shapes are fixed by the bucket,
so a row's result does not depend on the other rows. Must stay in a .py file (Triton's interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from treespec.plugins.tree_attention.kernel import dot_precision

BLOCK_N = 32


@triton.jit
def linear_kernel(X, W, BIAS, OUT, M, N, K,
                  HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # OUT [M, N] = X [M, K] @ W[:N].T (+ bias); SILU_MUL: W is [2N, K] (gate rows, then up rows)
    # and OUT = SiLU(X @ gate.T) * (X @ up.T), each GEMM output rounded to the dtype as HF does.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(X + rm[:, None].to(tl.int64) * K + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_ptr = W + rn[None, :].to(tl.int64) * K + (k0 + rk)[:, None]  # [BLOCK_K, BLOCK_N]
        w = tl.load(w_ptr, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
        if SILU_MUL:
            up = tl.load(w_ptr + N * K, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc_up = tl.dot(x, up, acc_up, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SILU_MUL:
            acc_up += tl.load(BIAS + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    dtype = OUT.dtype.element_ty
    if SILU_MUL:
        gate = acc.to(dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        acc = act * acc_up.to(dtype).to(tl.float32)
    tl.store(OUT + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def qkv_rope_kernel(X, W, WROT, BIAS, BIAS_ROT, POS, LENGTHS, COS, SIN, Q, KC, VC, M, K, T,
                    skb, skh, skr, svb, svh, svr,
                    HAS_BIAS: tl.constexpr, H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr,
                    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program: BLOCK_M rows x one head of the QKV projection. Q and K heads also accumulate
    # x @ WROT.T = rotate_half(x @ W.T), so RoPE is q * cos + q_rot * sin in the epilogue; Q goes
    # to Q [M, H * D], K and V straight to their cache rows L_b + t.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    rn = tl.arange(0, D)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    w_rows = (head * D + rn).to(tl.int64)
    rotate = w_rows < (H + KVH) * D  # [D]: all true for a Q or K head, all false for a V head
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    acc_rot = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(X + rm[:, None].to(tl.int64) * K + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        offs = w_rows[None, :] * K + (k0 + rk)[:, None]  # [BLOCK_K, D]
        acc = tl.dot(x, tl.load(W + offs, mask=k_ok[:, None], other=0.0), acc, input_precision=DOT_PREC)
        w_rot = tl.load(WROT + offs, mask=k_ok[:, None] & rotate[None, :], other=0.0)  # V heads: no reads
        acc_rot = tl.dot(x, w_rot, acc_rot, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + w_rows).to(tl.float32)[None, :]
        acc_rot += tl.load(BIAS_ROT + w_rows, mask=rotate, other=0.0).to(tl.float32)[None, :]
    pos = tl.load(POS + rm, mask=m_ok, other=0).to(tl.int64)
    trig = pos[:, None] * D + rn[None, :]
    cos = tl.load(COS + trig, mask=m_ok[:, None], other=0.0)
    sin = tl.load(SIN + trig, mask=m_ok[:, None], other=0.0)
    y = tl.where(rotate[None, :], acc * cos + acc_rot * sin, acc)
    b = (rm // T).to(tl.int64)
    row = tl.load(LENGTHS + b, mask=m_ok, other=0) + rm % T
    if head < H:
        tl.store(Q + rm[:, None].to(tl.int64) * (H * D) + head * D + rn[None, :], y.to(Q.dtype.element_ty),
                 mask=m_ok[:, None])
    elif head < H + KVH:
        dst = KC + (b * skb + (head - H) * skh + row * skr)[:, None] + rn[None, :]
        tl.store(dst, y.to(KC.dtype.element_ty), mask=m_ok[:, None])
    else:
        dst = VC + (b * svb + (head - H - KVH) * svh + row * svr)[:, None] + rn[None, :]
        tl.store(dst, y.to(VC.dtype.element_ty), mask=m_ok[:, None])


def rotated_rows(weight: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """The first `heads` heads of a [N, ...] projection with rotate_half applied to its output
    rows: x @ rotated.T == rotate_half(x @ weight[:heads * dim].T) per head."""
    w = weight[:heads * dim].reshape(heads, dim, *weight.shape[1:])
    half = dim // 2
    return torch.cat([-w[:, half:], w[:, :half]], 1).reshape(heads * dim, *weight.shape[1:]).contiguous()


def qkv_rope(x: torch.Tensor, qkv: torch.Tensor, qk_rot: torch.Tensor, bias: torch.Tensor | None,
             bias_rot: torch.Tensor | None, pos: torch.Tensor, lengths: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tokens: int, heads: int,
             kv_heads: int) -> torch.Tensor:
    """x [M = B*T, K]; qkv [(H + 2 KVH) * D, K]; qk_rot = rotated_rows(qkv, H + KVH, D): the QKV
    GEMM with RoPE, K/V written to cache rows L_b + t. Returns the rotated Q [M, H * D]."""
    rows, k = x.shape
    dim = cos.shape[1]
    q = torch.empty(rows, heads * dim, dtype=x.dtype, device=x.device)
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(rows, block_m), heads + 2 * kv_heads)
    has_bias = bias is not None
    qkv_rope_kernel[grid](x, qkv, qk_rot, bias if has_bias else qkv, bias_rot if has_bias else qkv, pos, lengths,
                          cos, sin, q, k_cache, v_cache, rows, k, tokens,
                          k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                          v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                          HAS_BIAS=has_bias, H=heads, KVH=kv_heads, D=dim, DOT_PREC=dot_precision(x.dtype),
                          BLOCK_M=block_m, BLOCK_K=64, num_warps=4)
    return q


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int, silu_mul: bool) -> torch.Tensor:
    rows, k = x.shape
    if x.stride(1) != 1 or x.stride(0) != k or not weight.is_contiguous():
        raise ValueError("triton linear needs a contiguous [M, K] input and [N, K] weight")
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    # Narrow tiles: at 64 rows SmolLM2's GEMMs have few tiles, and more programs read the weights
    # in parallel (down_proj: 18 programs of 98 KB each instead of 9 of 196 KB).
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, BLOCK_N))
    linear_kernel[grid](x, weight, bias if bias is not None else weight, out, rows, n, k,
                        HAS_BIAS=bias is not None, SILU_MUL=silu_mul, DOT_PREC=dot_precision(x.dtype),
                        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=64, num_warps=4)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype, one kernel."""
    return _launch(x, weight, bias, weight.shape[0], False)


def linear_silu_mul(x: torch.Tensor, gate_up: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], gate_up [2I, K] (gate rows, then up rows) -> SiLU(x @ gate.T) * (x @ up.T) [M, I]."""
    return _launch(x, gate_up, bias, gate_up.shape[0] // 2, True)

"""Element-wise Triton kernels that, with three cuBLAS GEMMs and the position-ordered attention,
make one decoder layer nine kernels instead of ~40 (issue 16).

Why: one SmolLM2 step on the H200 is ~1,200 small kernels taking 2.9-3.6 ms while its weights
need 0.06 ms, so the step is made of too many kernels, not of too many bytes. Each kernel here
replaces a chain of PyTorch ops:

* `add_rmsnorm`: residual add + RMSNorm (or the embedding gather + RMSNorm of layer 0), writing
  the new residual stream and the normed activations;
* `rope_write`: RoPE of the Q and K heads of the fused QKV GEMM's output, Q in place, K and V
  written straight into their cache rows (length + t);
* `silu_mul`: SiLU(gate) * up over the fused gate/up GEMM's output;
* `tree_ancestors`: the ordered attention's per-token ancestor lists from the tree mask.

Every kernel works on one row (token) at a time and never mixes rows, so a token's result does
not depend on the other rows of the step: with the GEMMs' fixed shapes per bucket this keeps a
node verified in a tree bitwise equal to plain decoding in fp16. Roundings follow HF's Llama
modules (sums in fp32, rounded to the model dtype where HF rounds). Must stay in a .py file:
Triton's interpreter (TRITON_INTERPRET=1) reads the source.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from treespec.plugins.pdl import pdl_launch, pdl_start


@triton.jit
def add_rmsnorm_kernel(X, IDS, RES, W, NORMED, M, N, eps,
                       GATHER: tl.constexpr, ADD: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    if GATHER:  # layer 0: X is the embedding table, the row's token id picks the row
        src = tl.load(IDS + row).to(tl.int64)
        h = tl.load(X + src * N + offs, mask=ok, other=0.0)
    elif SPLIT > 0:  # X: fp32 partial sums [SPLIT, M, N] of a split-K GEMM, added in order, rounded
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            acc += tl.load(X + (s * M + row) * N + offs, mask=ok, other=0.0)
        h = acc.to(RES.dtype.element_ty)
    else:
        h = tl.load(X + row * N + offs, mask=ok, other=0.0)
    if ADD:  # h = residual + x, rounded to the model dtype as HF's `residual + out` is
        r = tl.load(RES + row * N + offs, mask=ok, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(RES.dtype.element_ty)
    tl.store(RES + row * N + offs, h.to(RES.dtype.element_ty), mask=ok)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / N
    y = (hf * tl.rsqrt(var + eps)).to(NORMED.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(NORMED + row * N + offs, (y * w).to(NORMED.dtype.element_ty), mask=ok)


@triton.jit
def rope_write_kernel(QKV, POS, LENGTHS, COS, SIN, KC, VC, T, s_row,
                      skb, skh, skr, svb, svh, svr,
                      H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    row = tl.program_id(0)  # b * T + t
    head = tl.program_id(1)  # Q heads, then K heads, then V heads
    b = row // T
    t = row % T
    offs = tl.arange(0, HALF)
    src = QKV + row.to(tl.int64) * s_row + head * D
    x1 = tl.load(src + offs).to(tl.float32)
    x2 = tl.load(src + HALF + offs).to(tl.float32)
    p = tl.load(POS + row).to(tl.int64) * D
    rotate = head < H + KVH
    y1 = tl.where(rotate, x1 * tl.load(COS + p + offs) - x2 * tl.load(SIN + p + offs), x1)
    y2 = tl.where(rotate, x2 * tl.load(COS + p + HALF + offs) + x1 * tl.load(SIN + p + HALF + offs), x2)
    dst_row = (tl.load(LENGTHS + b) + t).to(tl.int64)
    if head < H:  # Q: in place, read by the attention kernel
        tl.store(src + offs, y1.to(QKV.dtype.element_ty))
        tl.store(src + HALF + offs, y2.to(QKV.dtype.element_ty))
    elif head < H + KVH:
        dst = KC + b.to(tl.int64) * skb + (head - H) * skh + dst_row * skr
        tl.store(dst + offs, y1.to(KC.dtype.element_ty))
        tl.store(dst + HALF + offs, y2.to(KC.dtype.element_ty))
    else:
        dst = VC + b.to(tl.int64) * svb + (head - H - KVH) * svh + dst_row * svr
        tl.store(dst + offs, y1.to(VC.dtype.element_ty))
        tl.store(dst + HALF + offs, y2.to(VC.dtype.element_ty))


@triton.jit
def silu_mul_kernel(GU, OUT, INTER, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < INTER
    gate = tl.load(GU + row * 2 * INTER + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GU + row * 2 * INTER + INTER + offs, mask=ok, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(OUT.dtype.element_ty).to(tl.float32)  # HF rounds SiLU first
    tl.store(OUT + row * INTER + offs, (act * up).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def tree_ancestors_kernel(MASK, ANCESTORS, DEPTHS, T, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    j = tl.arange(0, BLOCK_T)
    ok = j < T
    visible = (tl.load(MASK + row * T + j, mask=ok, other=0) != 0) & ok
    # rank of column j among the visible columns = the depth of that ancestor
    before = (j[:, None] <= j[None, :]) & visible[:, None]
    rank = tl.sum(before.to(tl.int32), axis=0) - 1
    hit = (rank[None, :] == j[:, None]) & visible[None, :]  # [depth e, column j]
    ancestors = tl.sum(tl.where(hit, j[None, :], 0), axis=1)
    tl.store(ANCESTORS + row * T + j, ancestors.to(tl.int32), mask=ok)
    tl.store(DEPTHS + row, tl.sum(visible.to(tl.int32), axis=0) - 1)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, normed: torch.Tensor, weight: torch.Tensor,
                eps: float, ids: torch.Tensor | None = None, add: bool = True, pdl: bool = False) -> None:
    """residual [M, N] (+)= x [M, N]; normed [M, N] = RMSNorm(residual) * weight. With `ids` [M]:
    x is the embedding table [V, N] and the rows are gathered (no add). A 3-d fp32 x [S, M, N]
    holds the partial sums of a split-K GEMM (plugins/fused/gemm.py). `pdl`: launched with
    programmatic dependent launch where the device has it (treespec.plugins.pdl)."""
    rows, width = residual.shape
    gather = ids is not None
    split = x.shape[0] if x.dim() == 3 else 0
    options = pdl_launch(normed.device, pdl)
    add_rmsnorm_kernel[(rows,)](x, ids if gather else x, residual, weight, normed, rows, width, eps,
                                GATHER=gather, ADD=add and not gather, SPLIT=split,
                                BLOCK=triton.next_power_of_2(width), PDL=bool(options),
                                num_warps=4, **options)


def rope_write(qkv: torch.Tensor, pos: torch.Tensor, lengths: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, tokens: int, heads: int, kv_heads: int) -> None:
    """qkv [M = B*T, (H + 2 KVH) * D] (rows contiguous); pos [B, T]; cos/sin [positions, D] fp32;
    k/v_cache [B, KVH, rows, D]: Q rotated in place, K rotated and V copied to cache row L_b + t."""
    dim = cos.shape[1]
    grid = (qkv.shape[0], heads + 2 * kv_heads)
    rope_write_kernel[grid](qkv, pos, lengths, cos, sin, k_cache, v_cache, tokens, qkv.stride(0),
                            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                            H=heads, KVH=kv_heads, D=dim, HALF=dim // 2, num_warps=1)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2I] (gate columns, then up) -> SiLU(gate) * up [M, I]."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, BLOCK=block, num_warps=4)
    return out


def tree_ancestors(tree_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tree_mask [B, T, T] (any integer or bool dtype, contiguous) -> ancestors [B, T, T] int32 and
    depths [B, T] int32, as treespec.plugins.tree_attention.ordered.tree_ancestors, in one kernel."""
    batch, tokens, _ = tree_mask.shape
    ancestors = torch.empty(batch, tokens, tokens, dtype=torch.int32, device=tree_mask.device)
    depths = torch.empty(batch, tokens, dtype=torch.int32, device=tree_mask.device)
    tree_ancestors_kernel[(batch * tokens,)](tree_mask, ancestors, depths, tokens,
                                             BLOCK_T=triton.next_power_of_2(tokens),
                                             num_warps=8 if tokens >= 64 else 4)
    return ancestors, depths

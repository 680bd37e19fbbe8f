"""Triton kernels for tree (verification) attention and their PyTorch launcher.

Flash-attention style: one program owns BLOCK_M query rows of one (batch, KV head) and streams
that head's K/V once, with an online softmax in fp32 — first the valid past rows of the cache,
then the T new keys under the tree mask. Rows are the flattened (head in the KV group, token)
pairs, so the G = H // KVH query heads of a KV head share every K/V tile (GQA without repeating
K/V). `tree_attention_kernel` is the single-launch kernel that the TensorRT plugin runs
(aot.py compiles it). For long caches with few (batch x KV head) pairs, the launcher can also
split the cache across programs (`tree_attention_split_kernel`) and merge the partial results
with `tree_attention_combine_kernel`: two launches and an fp32 workspace, which a TensorRT
Quick Deployable Plugin (one AOT kernel, no workspace) cannot express.

Argument order of `tree_attention_kernel` is TensorRT's AOT convention: input pointers, int32
scalars, output pointers (see aot.KERNEL_ARGS). Must stay in a .py file: Triton's interpreter
(TRITON_INTERPRET=1) reads the source.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .config import SUPPORTED_HEAD_DIMS, KernelConfig, pick_config, pick_splits
from .reference import check_shapes

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _scan_keys(acc, m_i, l_i, q, k_base, v_base, lo, hi, mask_rows, row_ok, offs_d,
               QK_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, TREE: tl.constexpr,
               DOT_PREC: tl.constexpr):
    # Keys lo..hi-1 at k_base/v_base (row stride D). TREE: visibility comes from the int32
    # tree-mask row of each query (mask_rows points at tree_mask[b, t, 0]).
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        k_t = tl.load(k_base + offs_n[None, :] * D + offs_d[:, None], mask=key_ok[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PREC) * QK_SCALE
        if TREE:
            seen = tl.load(mask_rows[:, None] + offs_n[None, :], mask=row_ok[:, None] & key_ok[None, :], other=0)
            s = tl.where(seen != 0, s, float("-inf"))
        else:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * D + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, v, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def empty_state(BLOCK_M: tl.constexpr, D: tl.constexpr):
    """Online-softmax state of BLOCK_M query rows: accumulator, running max, running sum."""
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    return acc, m_i, l_i


@triton.jit
def softmax_step(acc, m_i, l_i, s, v, DOT_PREC: tl.constexpr):
    """Fold one block of base-2 scores s [M, N] (-inf = hidden) and its values v [N, D] in."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _program_rows(H, KVH, T, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // KVH
    kvh = pid_bk % KVH
    groups = H // KVH
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < groups * T
    # Row r of KV head kvh is query head kvh*G + r // T, token r % T: rows are contiguous in q/out.
    row0 = (b * H + kvh * groups).to(tl.int64) * T
    return b, kvh, offs_m, row_ok, row0


@triton.jit
def _program_inputs(Q, PAST_LEN, TREE_MASK, b, kvh, offs_m, row_ok, row0, KVH, T, C, D: tl.constexpr):
    # The program's query rows, valid past length, K/V offsets of its (batch, KV head) in the
    # past and new buffers, and the tree-mask row of each query row.
    offs_d = tl.arange(0, D)
    q = tl.load(Q + (row0 + offs_m[:, None]) * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    past_len = tl.minimum(tl.maximum(tl.load(PAST_LEN + b), 0), C)
    kv_past = (b * KVH + kvh).to(tl.int64) * C * D
    kv_new = (b * KVH + kvh).to(tl.int64) * T * D
    mask_rows = TREE_MASK + b.to(tl.int64) * T * T + (offs_m % T) * T
    return offs_d, q, past_len, kv_past, kv_new, mask_rows


@triton.jit
def tree_attention_kernel(Q, K_NEW, V_NEW, PAST_K, PAST_V, PAST_LEN, TREE_MASK,
                          H, KVH, T, C,
                          OUT,
                          SCALE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    b, kvh, offs_m, row_ok, row0 = _program_rows(H, KVH, T, BLOCK_M)
    offs_d, q, past_len, kv_past, kv_new, mask_rows = _program_inputs(
        Q, PAST_LEN, TREE_MASK, b, kvh, offs_m, row_ok, row0, KVH, T, C, D)
    acc, m_i, l_i = empty_state(BLOCK_M, D)
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634  # softmax in base 2
    acc, m_i, l_i = _scan_keys(acc, m_i, l_i, q, PAST_K + kv_past, PAST_V + kv_past, 0, past_len,
                               mask_rows, row_ok, offs_d, QK_SCALE, D, BLOCK_N, False, DOT_PREC)
    acc, m_i, l_i = _scan_keys(acc, m_i, l_i, q, K_NEW + kv_new, V_NEW + kv_new, 0, T,
                               mask_rows, row_ok, offs_d, QK_SCALE, D, BLOCK_N, True, DOT_PREC)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(OUT + (row0 + offs_m[:, None]) * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def tree_attention_split_kernel(Q, K_NEW, V_NEW, PAST_K, PAST_V, PAST_LEN, TREE_MASK,
                                H, KVH, T, C, CHUNK,
                                O_PART, LSE_PART,
                                SCALE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    # Split s covers past rows [s*CHUNK, (s+1)*CHUNK); split 0 also covers the tree keys.
    # Writes its normalised partial output and log2-sum-exp per row.
    b, kvh, offs_m, row_ok, row0 = _program_rows(H, KVH, T, BLOCK_M)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    offs_d, q, past_len, kv_past, kv_new, mask_rows = _program_inputs(
        Q, PAST_LEN, TREE_MASK, b, kvh, offs_m, row_ok, row0, KVH, T, C, D)
    acc, m_i, l_i = empty_state(BLOCK_M, D)
    QK_SCALE: tl.constexpr = SCALE * 1.4426950408889634
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, past_len)
    acc, m_i, l_i = _scan_keys(acc, m_i, l_i, q, PAST_K + kv_past, PAST_V + kv_past, lo, hi,
                               mask_rows, row_ok, offs_d, QK_SCALE, D, BLOCK_N, False, DOT_PREC)
    if split == 0:
        acc, m_i, l_i = _scan_keys(acc, m_i, l_i, q, K_NEW + kv_new, V_NEW + kv_new, 0, T,
                                   mask_rows, row_ok, offs_d, QK_SCALE, D, BLOCK_N, True, DOT_PREC)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = (row0 + offs_m) * splits + split
    tl.store(O_PART + part[:, None] * D + offs_d[None, :], out, mask=row_ok[:, None])
    tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def tree_attention_combine_kernel(O_PART, LSE_PART, OUT, ROWS, SPLITS,
                                  D: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < ROWS
    offs_d = tl.arange(0, D)
    acc, m_i, l_i = empty_state(BLOCK_R, D)
    for s in range(0, SPLITS):
        part = offs_r.to(tl.int64) * SPLITS + s
        lse = tl.load(LSE_PART + part, mask=row_ok, other=float("-inf"))
        o = tl.load(O_PART + part[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        w = tl.exp2(lse - m_ref)
        acc = acc * alpha[:, None] + w[:, None] * o
        l_i = l_i * alpha + w
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(OUT + offs_r.to(tl.int64)[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None])


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 tensor cores (10-bit mantissa).
    return "ieee" if dtype == torch.float32 else "tf32"


def default_splits(batch: int, kv_heads: int, row_blocks: int, capacity: int, config: KernelConfig,
                   device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return 1, max(capacity, config.block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return pick_splits(batch, kv_heads, row_blocks, capacity, config.block_n, sms)


def tree_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, past_k: torch.Tensor,
                   past_v: torch.Tensor, past_lengths: torch.Tensor, tree_mask: torch.Tensor,
                   scale: float | None = None, *, config: KernelConfig | None = None,
                   splits: int | None = None) -> torch.Tensor:
    """Tree attention of q [B,H,T,D] over the valid past rows and the visible new keys.

    splits=None picks the split-KV path on CUDA when the grid would be small, 1 forces the
    single-launch kernel (the one TensorRT runs), n > 1 forces n cache splits.
    """
    check_shapes(q, k_new, v_new, past_k, past_v, past_lengths, tree_mask)
    if q.dtype not in _DTYPES or any(t.dtype != q.dtype for t in (k_new, v_new, past_k, past_v)):
        raise TypeError(f"q, k_new, v_new, past_k, past_v must share one of {_DTYPES}")
    batch, heads, tokens, dim = q.shape
    kv_heads, capacity = k_new.shape[1], past_k.shape[2]
    if dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {dim} not supported (one of {SUPPORTED_HEAD_DIMS})")
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    config = config or pick_config(heads, kv_heads, tokens, dim)
    q, k_new, v_new, past_k, past_v = (t.contiguous() for t in (q, k_new, v_new, past_k, past_v))
    lengths = past_lengths.to(device=q.device, dtype=torch.int32).contiguous()
    mask = tree_mask.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out

    row_blocks = triton.cdiv((heads // kv_heads) * tokens, config.block_m)
    if splits is None:
        splits, chunk = default_splits(batch, kv_heads, row_blocks, capacity, config, q.device)
    else:
        chunk = triton.cdiv(triton.cdiv(max(capacity, 1), splits), config.block_n) * config.block_n
    meta = dict(SCALE=scale, D=dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                DOT_PREC=dot_precision(q.dtype), num_warps=config.num_warps,
                num_stages=config.num_stages)
    if splits <= 1:
        tree_attention_kernel[(row_blocks, batch * kv_heads)](
            q, k_new, v_new, past_k, past_v, lengths, mask, heads, kv_heads, tokens, capacity, out, **meta)
        return out

    rows = batch * heads * tokens
    o_part = torch.empty((rows, splits, dim), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((rows, splits), device=q.device, dtype=torch.float32)
    tree_attention_split_kernel[(row_blocks, batch * kv_heads, splits)](
        q, k_new, v_new, past_k, past_v, lengths, mask, heads, kv_heads, tokens, capacity, chunk,
        o_part, lse_part, **meta)
    block_r = 16
    tree_attention_combine_kernel[(triton.cdiv(rows, block_r),)](
        o_part, lse_part, out, rows, splits, D=dim, BLOCK_R=block_r, num_warps=4)
    return out

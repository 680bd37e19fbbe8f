"""Position-ordered tree attention: bit-identical results for a token whatever step verified it.

Why: greedy speculative decoding is lossless only if the target's argmax for a token is the same
whether the token was decoded alone (plain decoding) or verified inside a tree. In fp16 that
needs the same arithmetic, not just the same maths. A masked attention over a KV buffer (SDPA,
flash attention, `kernel.py`) reduces over buffer columns; a tree node's ancestors sit at its tree
indices in the scratch rows, while in plain decoding the same keys sit at consecutive rows, so
the keys fall into different tiles and the sums round differently: an argmax at a near tie
flips (seen on the H100 in 1-3 of 10 bench prompts).

Here one program owns one query token (all G query heads of one KV head) and walks the keys in
order of their absolute position 0..n in fixed blocks of BLOCK_N positions. Position p < L (the
sequence's committed length) reads cache row p; position L + e reads the row of the query's
ancestor at depth e (`ancestors[b, t, e]`, a tree index, stored at cache row L + index). A token
at absolute position n therefore sees the same key values in the same blocks in the same order
in every step shape, and gets bit-identical output. Cost: each query token scans the whole past
(no sharing across tokens), which at SmolLM2's sizes stays in L2 and is launch-bound anyway.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..pdl import pdl_launch, pdl_start
from .kernel import dot_precision, empty_state, softmax_step

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class OrderedLaunch:
    """Launch parameters of the ordered kernel. Every step shape of a model must use the same ones
    (the key blocks fix the summation order, hence the bits), so they are process-wide, not tuned
    per shape. tools/attention_tune.py times the candidates on a GPU; TREESPEC_ORDERED_ATTENTION
    ("BLOCK_N,warps,stages") overrides the default for such experiments.

    The default won on an H100 (bench/h100-2026-12-07-pm/attention_tune.json; SmolLM2's heads, 320
    cached tokens, replayed from a CUDA graph): 128-key blocks, 4 warps, 3 pipeline stages, 5.3 /
    7.0 / 7.0 us per launch at batch 1 T 1 / batch 1 T 64 / batch 8 T 8, against 8.1 / 9.8 / 9.9 for
    the former 64-key blocks without pipelining (the loop over key blocks is latency-bound: fewer,
    overlapped iterations)."""

    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def parse(cls, text: str) -> "OrderedLaunch":
        rule = (f"TREESPEC_ORDERED_ATTENTION={text!r}: want 'BLOCK_N,warps,stages' with BLOCK_N a power of two"
                " in 16..256, warps 1, 2, 4 or 8, stages 1..4")
        try:
            block_n, warps, stages = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(rule) from None
        if block_n & (block_n - 1) or not 16 <= block_n <= 256 or warps not in (1, 2, 4, 8) or not 1 <= stages <= 4:
            raise ValueError(rule)
        return cls(block_n, warps, stages)


LAUNCH = OrderedLaunch.parse(os.environ["TREESPEC_ORDERED_ATTENTION"]) if os.environ.get(
    "TREESPEC_ORDERED_ATTENTION") else OrderedLaunch()


@triton.jit
def ordered_tree_attention_kernel(Q, K, V, LENGTHS, ANCESTORS, DEPTHS, OUT,
                                  T, H,
                                  sqb, sqh, sqt, skb, skh, skr, svb, svh, svr,
                                  QK_SCALE: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                                  STAGES: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)  # launched while the QKV kernel ends, waits for its Q and K/V rows
    pid = tl.program_id(0)  # b * T + t
    kvh = tl.program_id(1)
    b = pid // T
    t = pid % T
    length = tl.load(LENGTHS + b).to(tl.int32)
    last = length + tl.load(DEPTHS + pid)  # this token's absolute position: keys 0..last
    offs_g = tl.arange(0, BLOCK_M)
    g_ok = offs_g < G
    heads = kvh * G + offs_g
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + t * sqt + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    acc, m_i, l_i = empty_state(BLOCK_M, D)
    k_base = K + b.to(tl.int64) * skb + kvh * skh
    v_base = V + b.to(tl.int64) * svb + kvh * svh
    ancestors = ANCESTORS + pid.to(tl.int64) * T
    for start in tl.range(0, last + 1, BLOCK_N, num_stages=STAGES):  # STAGES > 1: loads run ahead
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos <= last
        in_tree = pos >= length
        node = tl.load(ancestors + (pos - length), mask=ok & in_tree, other=0)
        rows = tl.where(in_tree, length + node, pos).to(tl.int64)
        k_t = tl.load(k_base + rows[None, :] * skr + offs_d[:, None], mask=ok[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PREC) * QK_SCALE
        s = tl.where(ok[None, :], s, float("-inf"))
        v = tl.load(v_base + rows[:, None] * svr + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, v, DOT_PREC)
    out = acc / l_i[:, None]
    dst = OUT + (pid.to(tl.int64) * H + heads[:, None]) * D + offs_d[None, :]
    tl.store(dst, out.to(OUT.dtype.element_ty), mask=g_ok[:, None])


def tree_ancestors(tree_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From a [B, T, T] ancestor mask (parents before children, each row visible to itself):
    ancestors [B, T, T] int32 (entry e of row t: tree index of t's ancestor at depth e, the last
    being t) and depths [B, T] int32. Runs on the device, inside CUDA graphs."""
    visible = tree_mask.bool()
    batch, tokens, _ = visible.shape
    rank = visible.to(torch.int32).cumsum(-1) - 1  # depth of each visible column
    slot = torch.where(visible, rank, torch.full_like(rank, tokens)).long()
    index = torch.arange(tokens, device=visible.device, dtype=torch.int32).expand(batch, tokens, tokens)
    ancestors = torch.zeros(batch, tokens, tokens + 1, dtype=torch.int32, device=visible.device)
    ancestors.scatter_(2, slot, index)  # hidden columns all land in the spare last slot
    depths = visible.sum(-1, dtype=torch.int32) - 1
    return ancestors[..., :tokens].contiguous(), depths.contiguous()


def ordered_tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           lengths: torch.Tensor, ancestors: torch.Tensor, depths: torch.Tensor,
                           scale: float, launch: OrderedLaunch | None = None, pdl: bool = False) -> torch.Tensor:
    """q [B, H, T, D] (any strides, last dim contiguous); k/v_cache [B, KVH, rows, D] holding the
    committed rows [0, L_b) and this step's tree rows at [L_b, L_b + T); lengths [B] (L_b).
    Returns [B, T, H, D] in q's dtype. `pdl`: launched with programmatic dependent launch where
    the device has it (treespec.plugins.pdl), for a kernel chain built for it."""
    batch, heads, tokens, dim = q.shape
    kv_heads = k_cache.shape[1]
    groups = heads // kv_heads
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"ordered tree attention needs a power-of-two head dim >= 16, got {dim}")
    for x in (q, k_cache, v_cache):
        if x.stride(-1) != 1:
            raise ValueError("ordered tree attention needs the head dim contiguous")
    out = torch.empty(batch, tokens, heads, dim, dtype=q.dtype, device=q.device)
    block_m = max(16, triton.next_power_of_2(groups))
    options = pdl_launch(q.device, pdl)
    launch = launch or LAUNCH
    ordered_tree_attention_kernel[(batch * tokens, kv_heads)](
        q, k_cache, v_cache, lengths, ancestors, depths, out, tokens, heads,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        QK_SCALE=scale * LOG2E, D=dim, G=groups, BLOCK_M=block_m, BLOCK_N=launch.block_n,
        DOT_PREC=dot_precision(q.dtype), STAGES=launch.num_stages, PDL=bool(options),
        num_warps=launch.num_warps, **options)
    return out

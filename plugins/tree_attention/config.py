"""Tile configurations of the tree-attention kernel, shared by the launcher, AOT and TensorRT.

Rows of one program are the flattened (query head of a KV group, tree token) pairs of a single
KV head: G = H // KVH heads times T tokens share every K/V tile that program loads, which is
what makes GQA cheap in this memory-bound regime.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # query rows (head-in-group x token) per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int

    @property
    def threads(self) -> int:
        return self.num_warps * 32


# TensorRT tactics (ids are stable: they are written into engines). TensorRT times every tactic
# at the profile's opt shape and keeps the fastest; tactic 0 (no custom tactic) means tactic 1.
# aot.fit_shared_memory may lower num_stages, then block_n, to stay within the portable 48 KiB.
TACTICS: dict[int, KernelConfig] = {
    1: KernelConfig(block_m=16, block_n=64, num_warps=4, num_stages=3),
    2: KernelConfig(block_m=32, block_n=64, num_warps=4, num_stages=3),
    3: KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=3),
    4: KernelConfig(block_m=128, block_n=32, num_warps=8, num_stages=2),
}


def tactic_config(tactic: int) -> KernelConfig:
    return TACTICS[tactic if tactic in TACTICS else 1]


def rows_per_kv_head(heads: int, kv_heads: int, tokens: int) -> int:
    return (heads // kv_heads) * tokens


def pick_config(heads: int, kv_heads: int, tokens: int, head_dim: int) -> KernelConfig:
    """Tiles that did best on the H100 sweep (plugins/gpu/bench_kernel.py); 16-row tiles when a
    KV head has at most 16 rows (decoding, tiny trees). Head dim 256 is a guess (not measured)."""
    if rows_per_kv_head(heads, kv_heads, tokens) <= 16:
        return KernelConfig(block_m=16, block_n=64 if head_dim <= 128 else 32, num_warps=4, num_stages=3)
    if head_dim <= 64:
        return KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=3)
    return KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)


MIN_CHUNK = 256  # cache rows per split


def pick_splits(batch: int, kv_heads: int, row_blocks: int, capacity: int, block_n: int,
                num_sms: int) -> tuple[int, int]:
    """(splits, chunk) for the split-KV path: about two programs per SM, at least MIN_CHUNK cache
    rows per split, a power of two (fitted on the H100 sweep: within 5% of the best split on
    average, 21% at worst). chunk is a multiple of block_n."""
    programs = batch * kv_heads * row_blocks
    limit = max(1, min((2 * num_sms) // programs, capacity // MIN_CHUNK))
    splits = 1 << (limit.bit_length() - 1)
    chunk = math.ceil(math.ceil(max(capacity, 1) / splits) / block_n) * block_n
    return max(1, math.ceil(capacity / chunk)), chunk

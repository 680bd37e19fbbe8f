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
    """Smallest tile that covers the rows of a KV head, capped where registers run out."""
    rows = rows_per_kv_head(heads, kv_heads, tokens)
    block_m = 16
    while block_m < rows and block_m < (64 if head_dim > 64 else 128):
        block_m *= 2
    num_warps = 8 if block_m * head_dim >= 128 * 64 else 4
    return KernelConfig(block_m=block_m, block_n=64 if head_dim <= 128 else 32, num_warps=num_warps,
                        num_stages=2)


def pick_splits(batch: int, kv_heads: int, row_blocks: int, capacity: int, block_n: int,
                num_sms: int) -> tuple[int, int]:
    """(splits, chunk) for the split-KV path: enough programs for about one wave of the GPU,
    each split at least four key blocks long. chunk is a multiple of block_n."""
    programs = batch * kv_heads * row_blocks
    max_splits = max(1, capacity // (4 * block_n))
    splits = max(1, min(max_splits, math.ceil(num_sms / programs)))
    chunk = math.ceil(math.ceil(capacity / splits) / block_n) * block_n
    return math.ceil(capacity / chunk) if capacity else 1, max(chunk, block_n)

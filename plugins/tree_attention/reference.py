"""PyTorch reference for tree (verification) attention: plain math in fp32.

Shapes (the project's graph contract):
    q            [B, H, T, D]    queries of the T tree tokens (post-RoPE)
    k_new, v_new [B, KVH, T, D]  keys/values of the same T tokens
    past_k/v     [B, KVH, C, D]  fixed-capacity cache; row c is valid iff c < past_lengths[b]
    past_lengths int [B]
    tree_mask    bool [B, T, T]  query i sees new key j iff tree_mask[b, i, j]
Query head h reads KV head h // (H // KVH). Softmax runs over the valid past rows and the
visible new keys. A row that sees no key at all (only possible with an empty past and an
all-false mask row) is defined as 0, which is also what the kernel writes.
"""
from __future__ import annotations

import math

import torch


def check_shapes(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, past_k: torch.Tensor,
                 past_v: torch.Tensor, past_lengths: torch.Tensor, tree_mask: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, T, D], got {tuple(q.shape)}")
    batch, heads, tokens, dim = q.shape
    kv_heads = k_new.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads {heads} must be a multiple of KV heads {kv_heads}")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if tuple(t.shape) != (batch, kv_heads, tokens, dim):
            raise ValueError(f"{name} must be {(batch, kv_heads, tokens, dim)}, got {tuple(t.shape)}")
    if past_k.dim() != 4 or tuple(past_k.shape[:2]) != (batch, kv_heads) or past_k.shape[3] != dim:
        raise ValueError(f"past_k must be [B, KVH, C, D] = [{batch}, {kv_heads}, C, {dim}], got {tuple(past_k.shape)}")
    if past_v.shape != past_k.shape:
        raise ValueError(f"past_v {tuple(past_v.shape)} differs from past_k {tuple(past_k.shape)}")
    if tuple(past_lengths.shape) != (batch,):
        raise ValueError(f"past_lengths must be [{batch}], got {tuple(past_lengths.shape)}")
    if tuple(tree_mask.shape) != (batch, tokens, tokens):
        raise ValueError(f"tree_mask must be {(batch, tokens, tokens)}, got {tuple(tree_mask.shape)}")


def tree_attention_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                             past_k: torch.Tensor, past_v: torch.Tensor, past_lengths: torch.Tensor,
                             tree_mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Returns fp32 [B, H, T, D]."""
    check_shapes(q, k_new, v_new, past_k, past_v, past_lengths, tree_mask)
    batch, heads, tokens, dim = q.shape
    kv_heads = k_new.shape[1]
    groups = heads // kv_heads
    capacity = past_k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)

    keys = torch.cat([past_k, k_new], dim=2).float().repeat_interleave(groups, dim=1)  # [B,H,C+T,D]
    values = torch.cat([past_v, v_new], dim=2).float().repeat_interleave(groups, dim=1)
    rows = torch.arange(capacity, device=q.device)
    past_visible = rows[None, :] < past_lengths.to(q.device).long()[:, None]  # [B,C]
    visible = torch.cat([past_visible[:, None, :].expand(batch, tokens, capacity),
                         tree_mask.to(device=q.device, dtype=torch.bool)], dim=-1)  # [B,T,C+T]
    scores = torch.matmul(q.float(), keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-hidden rows -> 0
    return torch.matmul(probs, values)

"""EAGLE-2's dynamic tree with static shapes, as one function of device tensors (capturable).

Why static: a CUDA graph replays a fixed sequence of kernels on fixed buffers, so every level
drafts exactly K expanded nodes and every step keeps exactly min(N, K + (D-1)K^2) nodes; the
dynamic part of EAGLE-2 (which nodes) lives in the values, not in the shapes. The steps are
listed in runtime/drafters/eagle_torch.py; `eagle2_draft` below does them in that order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

@dataclass(frozen=True)
class Eagle2Shape:
    """The static shape of one captured EAGLE-2 draft."""

    batch: int
    depth: int  # D: drafted levels
    top_k: int  # K: children per expanded node, expanded nodes per level
    budget: int  # drafted nodes wanted

    @property
    def chain(self) -> int:
        """P: pending rows a step feeds at most (the accepted drafted tokens + the bonus token)."""
        return self.depth + 1

    @property
    def candidates(self) -> int:
        return self.top_k + (self.depth - 1) * self.top_k ** 2

    @property
    def kept(self) -> int:
        return min(self.budget, self.candidates)


class Eagle2Buffers:
    """Static inputs (host pinned + device), the outputs and (CUDA) the graph of one shape."""

    def __init__(self, shape: Eagle2Shape, hidden: int, dtype, device):
        b, p = shape.batch, shape.chain
        self.shape = shape
        cuda = device.type == "cuda"
        self.host = torch.zeros(b * p + 2 * b + 2 * b * p, dtype=torch.int64, pin_memory=cuda)
        self.ints = torch.zeros_like(self.host, device=device)
        self.feats = torch.zeros(b, p, hidden, dtype=dtype, device=device)
        # each candidate's depth (made here: a host-to-device copy cannot be captured)
        self.depths = torch.as_tensor(_candidate_depths(shape), device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple | None = None
        self.generation = -1

    def views(self):
        """(ids [B,P], lengths [B], count [B], gather_b [B*P], gather_row [B*P]) of the device ints."""
        b, p = self.shape.batch, self.shape.chain
        cuts = np.cumsum([b * p, b, b, b * p])
        ids, lengths, count, gather_b, gather_row = torch.tensor_split(self.ints, cuts.tolist())
        return ids.view(b, p), lengths, count, gather_b, gather_row


@dataclass
class _Candidates:
    """Every drafted candidate so far, level-major (a parent always has a smaller id)."""

    tokens: list[torch.Tensor]  # per level [B, n]
    scores: list[torch.Tensor]  # cumulative log-probabilities
    parents: list[torch.Tensor]  # the parent's candidate id, -1 for the root


@dataclass
class _Expanded:
    """The K nodes expanded per level, levels 1..D-1 side by side: what the head runs on."""

    feats: torch.Tensor  # [B, E, H] each node's input: its parent's predicted feature
    tokens: torch.Tensor  # [B, E]
    positions: torch.Tensor  # [B, E]
    ancestors: torch.Tensor  # bool [B, E, E]
    scores: torch.Tensor  # [B, E]
    ids: torch.Tensor  # [B, E] candidate ids


def eagle2_draft(head, buf: Eagle2Buffers):
    """The whole draft on buf's static inputs; returns (packed [B, 3N] float32: tokens, parent
    node indices and own log-probs of the N kept nodes, parents first; ancestor mask bool
    [B, N+1, N+1] and depths [B, N+1] of the tree with its root)."""
    shape = buf.shape
    ctx, root_feat, root_logits = _feed_pending(head, buf)
    lp, tok = torch.topk(torch.log_softmax(root_logits.float(), -1), shape.top_k, dim=-1)  # [B, K]
    exp = _first_level(shape, root_feat, tok, lp, ctx)
    cands = _Candidates([tok], [lp], [torch.full_like(tok, -1)])
    for level in range(1, shape.depth):
        _next_level(head, shape, exp, cands, ctx, level)
    return _rerank(shape, cands, buf.depths)


def _feed_pending(head, buf: Eagle2Buffers):
    """Feed (target feature, next token) rows and commit them; the root row's outputs."""
    ids, lengths, count, _, _ = buf.views()
    batch, chain = ids.shape
    steps = torch.arange(chain, device=ids.device)
    pos = lengths[:, None] + steps[None]
    causal = (steps[None, :] <= steps[:, None]).expand(batch, chain, chain)
    logits, feat, key, value = head.forward(buf.feats, ids, pos, causal, lengths)
    index = pos[:, None, :, None].expand(batch, key.shape[1], chain, key.shape[3])
    head.key.scatter_(2, index, key.to(head.key.dtype))  # rows >= count land past the new length
    head.value.scatter_(2, index, value.to(head.value.dtype))
    last = (count - 1).clamp(min=0)
    rows = torch.arange(batch, device=ids.device)
    return lengths + count, feat[rows, last], logits[rows, last]


def _first_level(shape: Eagle2Shape, root_feat, tok, lp, ctx) -> _Expanded:
    batch, k = tok.shape
    width = max(shape.depth - 1, 1) * k
    device = tok.device
    exp = _Expanded(feats=root_feat.new_zeros(batch, width, root_feat.shape[-1]),
                    tokens=tok.new_zeros(batch, width), positions=tok.new_zeros(batch, width),
                    ancestors=torch.zeros(batch, width, width, dtype=torch.bool, device=device),
                    scores=lp.new_zeros(batch, width), ids=tok.new_zeros(batch, width))
    exp.feats[:, :k] = root_feat[:, None]
    exp.tokens[:, :k] = tok
    exp.positions[:, :k] = ctx[:, None]  # a depth-d node's row sits at position ctx - 1 + d
    exp.ancestors[:, :k, :k] = torch.eye(k, dtype=torch.bool, device=device)
    exp.scores[:, :k] = lp
    exp.ids[:, :k] = torch.arange(k, device=device)
    return exp


def _next_level(head, shape: Eagle2Shape, exp: _Expanded, cands: _Candidates, ctx, level: int) -> None:
    """Draft the children of level `level`'s expanded nodes; expand the K best of them next."""
    k = shape.top_k
    hi = level * k
    lo = hi - k
    logits, feat, _, _ = head.forward(exp.feats[:, :hi], exp.tokens[:, :hi], exp.positions[:, :hi],
                                      exp.ancestors[:, :hi, :hi], ctx, first_logits_row=lo)
    child_lp, child_tok = torch.topk(torch.log_softmax(logits.float(), -1), k, dim=-1)  # [B,K,K]
    batch = child_tok.shape[0]
    cum = (exp.scores[:, lo:hi, None] + child_lp).reshape(batch, k * k)
    flat_tok = child_tok.reshape(batch, k * k)
    cands.tokens.append(flat_tok)
    cands.scores.append(cum)
    cands.parents.append(exp.ids[:, lo:hi].repeat_interleave(k, dim=1))
    if level + 1 >= shape.depth:
        return
    best, pick = torch.topk(cum, k, dim=-1)  # [B, K]
    parent = pick // k  # which of this level's expanded nodes
    new = slice(hi, hi + k)
    exp.scores[:, new] = best
    exp.tokens[:, new] = torch.gather(flat_tok, 1, pick)
    exp.ids[:, new] = k + (level - 1) * k * k + pick
    exp.positions[:, new] = ctx[:, None] + level
    exp.feats[:, new] = torch.gather(feat[:, lo:hi], 1, parent[..., None].expand(-1, -1, feat.shape[-1]))
    width = exp.ancestors.shape[-1]
    exp.ancestors[:, new] = torch.gather(exp.ancestors[:, lo:hi], 1, parent[..., None].expand(-1, -1, width))
    exp.ancestors[:, new, new] |= torch.eye(k, dtype=torch.bool, device=pick.device)


def _rerank(shape: Eagle2Shape, cands: _Candidates, depth_of: torch.Tensor):
    """The best N candidates (stable: ties keep the parent first), parents first, as a tree."""
    scores = torch.cat(cands.scores, 1)
    tokens = torch.cat(cands.tokens, 1)
    parents = torch.cat(cands.parents, 1)
    batch, n, device = scores.shape[0], shape.kept, scores.device
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]
    picked = torch.sort(best, dim=1).values  # candidate ids ascending: parents before children
    node_of = torch.zeros_like(scores, dtype=torch.int64)
    node_of.scatter_(1, picked, torch.arange(1, n + 1, device=device).expand(batch, n))
    parent_id = torch.gather(parents, 1, picked)
    is_root = parent_id < 0
    parent_node = torch.where(is_root, 0, torch.gather(node_of, 1, parent_id.clamp(min=0)))
    own = torch.gather(scores, 1, picked) - torch.where(is_root, 0.0, torch.gather(scores, 1, parent_id.clamp(min=0)))
    packed = torch.cat([torch.gather(tokens, 1, picked).float(), parent_node.float(), own.float()], 1)
    zero = parent_node.new_zeros(batch, 1)
    depths = torch.cat([zero, depth_of[picked]], 1)
    return packed, _ancestor_mask(torch.cat([zero, parent_node], 1), shape.depth), depths


def _ancestor_mask(parents, depth: int):
    """bool [B, N+1, N+1]: each node and its ancestors, by walking up `depth` times."""
    batch, size = parents.shape
    mask = torch.zeros(batch, size, size, dtype=torch.bool, device=parents.device)
    cur = torch.arange(size, device=parents.device).expand(batch, size).contiguous()
    for _ in range(depth + 1):
        mask.scatter_(2, cur[..., None], True)
        cur = torch.gather(parents, 1, cur)
    return mask


def _candidate_depths(shape: Eagle2Shape) -> np.ndarray:
    k = shape.top_k
    return np.concatenate([np.ones(k, np.int64)] + [np.full(k * k, d, np.int64) for d in range(2, shape.depth + 1)])

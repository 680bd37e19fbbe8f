"""EAGLE-2's dynamic tree with static shapes, as one function of device tensors (capturable).

Why static: a CUDA graph replays a fixed sequence of kernels on fixed buffers, so every level
drafts exactly K expanded nodes and every step keeps exactly min(N, K + (D-1)K^2) nodes; the
dynamic part of EAGLE-2 (which nodes) lives in the values, not in the shapes. The steps are
listed in runtime/drafters/eagle_torch.py; `eagle2_draft` below does them in that order.

Why few kernels: on the H200 each kernel of the replayed graph costs a few microseconds whatever
it does, so the draft's cost is its kernel count. The head runs one of two ways:
* `_TreeKVLevels` (the fused head, default on CUDA): each level runs the head on its K new nodes
  only; their K/V rows go past the rows of the earlier levels (cache row ctx + (level-1)K + j)
  and each node attends to the cache plus its ancestors' rows there (the ordered attention reads
  ancestor lists). The top-K children, each level's bookkeeping and the rerank are Triton kernels
  (runtime/drafters/eagle2_kernels.py); index tensors are constants made with the buffers (a
  host-to-device copy cannot be captured). d6-k8-n64: 111 launches (the unfused draft: 472);
  on the H200 (random SmolLM2-shaped weights, fp16) 109 kernels, 0.49 ms replayed (unfused
  682 kernels, 1.87 ms), of which the six lm_head GEMMs (49k x 576, bandwidth) take ~0.1 ms.
* `_RecomputedLevels` (the unfused HF-style head, the CPU default and the reference): each level
  runs the head on every expanded node so far (tree-masked), keeping the head's graph contract.
Both grow the same tree: the same candidates, scores up to float rounding, the same stable rerank.

With a draft vocabulary (treespec.models.draft_vocab) the logits are over its K ids: the children's
positions among them become target ids right where they are picked (one gather a level, in the
graph), so the tokens the next level embeds and the tree that crosses to the host are target ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from treespec.models.draft_vocab import target_ids
from treespec.runtime.backends.device_tensors import DeviceTree


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

    @property
    def tree_kv(self) -> bool:
        """Whether the tree-KV levels fit the ordered attention's [K, K] ancestor lists and the
        bookkeeping kernels' one-program-per-sequence tiles."""
        return self.depth - 1 <= self.top_k <= 16 and self.candidates < 4096


class Eagle2Buffers:
    """Static inputs (host pinned + device), constants, the outputs and (CUDA) the graph of one shape."""

    def __init__(self, shape: Eagle2Shape, hidden: int, dtype, device):
        b, p = shape.batch, shape.chain
        self.shape = shape
        cuda = device.type == "cuda"
        self.host = torch.zeros(2 * b * p + 3 * b, dtype=torch.int64, pin_memory=cuda)
        self.ints = torch.zeros_like(self.host, device=device)
        # views of the device ints, made once: ids [B,P], lengths [B], count [B], gather [B*P] (the rows
        # of the step output [B_out * T, H] holding each pending feature; 0 past a sequence's count) and
        # the roots [B] (node 0 of each tree)
        ids, self.lengths, self.count, self.gather, self.roots = torch.split(self.ints, [b * p, b, b, b * p, b])
        self.ids = ids.view(b, p)
        # the packed draft on the host (pinned: copied without waiting for work queued after the draft)
        self.packed_host = torch.zeros(b, 3 * shape.kept, pin_memory=cuda)
        self.ready = torch.cuda.Event() if cuda else None
        self.feats = torch.zeros(b, p, hidden, dtype=dtype, device=device)
        self.consts = _Constants.build(shape, device)
        self.scratch = _Scratch.build(shape, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, DeviceTree] | None = None  # packed draft, trees to verify
        self.generation = -1

    def host_views(self) -> tuple[np.ndarray, ...]:
        """(ids [B,P], lengths [B], count [B], gather [B,P], roots [B]) of the host ints, laid out as the
        device's."""
        b, p = self.shape.batch, self.shape.chain
        ids, lengths, count, gather, roots = np.split(self.host.numpy(), np.cumsum([b * p, b, b, b * p]))
        return ids.reshape(b, p), lengths, count, gather.reshape(b, p), roots


@dataclass
class _Constants:
    """Index tensors of one shape, made once with the buffers. Candidates are numbered in the
    'ext' order: 0 the root, then level 1's K, then each level's K^2, level-major."""

    steps: torch.Tensor  # [P] 0..P-1
    row_base: torch.Tensor  # [B] b*P, and row_last b*P - 1: the feed's last row per sequence
    row_last: torch.Tensor
    zero_f: torch.Tensor  # [B, 1] fp32 0 (the root's score)
    zero_i: torch.Tensor  # [B, 1] int64 0 (the root's token / parent)
    first_picks: torch.Tensor  # [B, K] 0..K-1: level 1 expands all its candidates
    pick_base: torch.Tensor  # [1, 1 + (D-1)K]: ext id of an expanded node = its pick + base
    parent_slot: torch.Tensor  # [B, 1 + C]: which expanded node (1-based, 0 the root) is the parent
    node_numbers: torch.Tensor  # [B, N + 1] 0..N
    chain_anc: torch.Tensor  # [B, P, P] int32 causal ancestor lists of the feed, chain_depth [B, P]
    chain_depth: torch.Tensor
    level_pos: torch.Tensor  # [D-1, 1, K] position offset of level l+1 (l), level_write [D-1, 1] lK
    level_write: torch.Tensor
    level_depth: torch.Tensor  # [D-1, B, K] int32 l
    anc_step: torch.Tensor  # [D-1, B, K, K] int32: column l of level l+1's lists is lK + j

    @staticmethod
    def build(shape: Eagle2Shape, device) -> "_Constants":
        b, p, k, d = shape.batch, shape.chain, shape.top_k, shape.depth
        i64 = dict(dtype=torch.int64, device=device)
        steps = torch.arange(p, **i64)
        base = torch.tensor([0] + [1] * k + [1 + k + (m - 2) * k * k for m in range(2, d) for _ in range(k)], **i64)
        slots = [0] * (1 + k) + [1 + (m - 2) * k + j for m in range(2, d + 1) for j in range(k) for _ in range(k)]
        chain = torch.where(steps[None] <= steps[:, None], steps[None], 0).to(torch.int32)
        levels = torch.arange(max(d - 1, 1), **i64)
        anc_step = torch.zeros(len(levels), b, k, k, dtype=torch.int32, device=device)
        for level in range(min(d - 1, k)):
            anc_step[level, :, :, level] = (level * k + torch.arange(k, device=device)).to(torch.int32)
        return _Constants(
            steps=steps, row_base=torch.arange(b, **i64) * p, row_last=torch.arange(b, **i64) * p - 1,
            zero_f=torch.zeros(b, 1, device=device), zero_i=torch.zeros(b, 1, **i64),
            first_picks=torch.arange(k, **i64).expand(b, k).contiguous(), pick_base=base[None],
            parent_slot=torch.tensor(slots, **i64).expand(b, -1).contiguous(),
            node_numbers=torch.arange(shape.kept + 1, **i64).expand(b, -1).contiguous(),
            chain_anc=chain.expand(b, p, p).contiguous(), chain_depth=steps.to(torch.int32).expand(b, p).contiguous(),
            level_pos=levels[:, None, None].expand(-1, 1, k).contiguous(), level_write=levels[:, None] * k,
            level_depth=levels.to(torch.int32)[:, None, None].expand(-1, b, k).contiguous(), anc_step=anc_step)


@dataclass
class _Scratch:
    """Static device tensors the tree-KV draft's kernels write, in ext order; the root's entries
    (and level 1's expanded nodes, ext ids 1..K) are constants set here."""

    scores: torch.Tensor  # [B, 1 + C] fp32 cumulative log-probabilities
    tokens: torch.Tensor  # [B, 1 + C] int64
    expanded: torch.Tensor  # [B, 1 + (D-1)K] int64 ext ids of the expanded nodes
    node_of: torch.Tensor  # [B, 1 + C] int32 the rerank's node numbers

    @staticmethod
    def build(shape: Eagle2Shape, device) -> "_Scratch":
        b, k, c1 = shape.batch, shape.top_k, 1 + shape.candidates
        expanded = torch.zeros(b, 1 + max(shape.depth - 1, 1) * k, dtype=torch.int64, device=device)
        expanded[:, :k + 1] = torch.arange(k + 1, device=device)
        return _Scratch(torch.zeros(b, c1, device=device), torch.zeros(b, c1, dtype=torch.int64, device=device),
                        expanded, torch.zeros(b, c1, dtype=torch.int32, device=device))


def eagle2_draft(head, buf: Eagle2Buffers) -> tuple[torch.Tensor, DeviceTree]:
    """The whole draft on buf's static inputs: packed [B, 3N] float32 (tokens, parent node indices
    and own log-probs of the N kept nodes, parents first), and the same trees as the target verifies
    them (N + 1 nodes with the root)."""
    if getattr(head, "fused", None) is not None and buf.shape.tree_kv:
        from treespec.runtime.drafters import eagle2_kernels  # Triton: an optional heavy dependency

        packed = _draft_tree_kv(head, buf)
        return packed, DeviceTree(*eagle2_kernels.tree_of(packed, buf.roots, buf.shape.depth))
    packed = _draft_recomputed(head, buf)
    return packed, device_tree(packed, buf.roots, buf.shape.depth)


def device_tree(packed: torch.Tensor, roots: torch.Tensor, depth: int) -> DeviceTree:
    """The reranked trees of `packed` under `roots` [B] as the target verifies them, in PyTorch ops
    (eagle2_kernels.tree_of does it in one launch on the fused path): one OR of gathered mask rows per
    level (after pass d a node's row holds its ancestors up to d levels up; the root is its own parent)."""
    batch, n = packed.shape[0], packed.shape[1] // 3
    ids = torch.cat([roots[:, None], packed[:, :n].long()], 1)
    parents = torch.cat([torch.zeros_like(roots[:, None]), packed[:, n:2 * n].long()], 1)
    rows = parents[:, :, None].expand(-1, -1, n + 1)
    mask = torch.eye(n + 1, dtype=torch.bool, device=ids.device).expand(batch, -1, -1)
    for _ in range(depth):
        mask = mask | mask.gather(1, rows)
    return DeviceTree(ids, mask.sum(-1) - 1, mask)


def _draft_tree_kv(head, buf: Eagle2Buffers) -> torch.Tensor:
    """The fused head's draft: bookkeeping in eagle2_kernels (one kernel a level, one rerank)."""
    from treespec.runtime.drafters import eagle2_kernels  # Triton: an optional heavy dependency

    shape, c, s = buf.shape, buf.consts, buf.scratch
    k, levels = shape.top_k, _TreeKVLevels(head, buf)

    def top_children(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, index = eagle2_kernels.top_children(logits, k)
        return scores, target_ids(index, head.draft_vocab)

    scores, tokens = top_children(levels.feed())  # level 1: the root's children [B, K]
    s.scores[:, 1:k + 1].copy_(scores)
    s.tokens[:, 1:k + 1].copy_(tokens)
    levels.first(tokens)
    for level in range(1, shape.depth):
        logits, feat = levels.run(level)  # the K nodes expanded at `level`: [B, K, V], [B, K, H]
        child_lp, child_tok = top_children(logits)  # [B, K, K]
        expand = level + 1 < shape.depth
        out = eagle2_kernels.expand_level(scores, child_lp, child_tok, feat, levels.anc,
                                          c.anc_step[level if expand else 0], s.scores, s.tokens, s.expanded,
                                          1 + k + (level - 1) * k * k, 1 + level * k, expand)
        if expand:
            scores, levels.tokens, levels.feats, levels.anc = out
    return eagle2_kernels.rerank(s.scores, s.tokens, s.expanded, c.parent_slot[0], s.node_of, shape.kept)


def _draft_recomputed(head, buf: Eagle2Buffers) -> torch.Tensor:
    """The unfused head's draft in PyTorch ops (the reference; runs anywhere)."""
    shape = buf.shape
    batch, k = shape.batch, shape.top_k
    levels = _RecomputedLevels(head, buf)
    scores, tokens = _top_children(head, levels.feed(), k)  # level 1: the root's children [B, K]
    levels.first(tokens)
    drafted = _Drafted([tokens], [scores], [buf.consts.first_picks])
    for level in range(1, shape.depth):
        logits, feat = levels.run(level)  # the K nodes expanded at `level`: [B, K, V], [B, K, H]
        child_lp, child_tok = _top_children(head, logits, k)  # [B, K, K]
        cum = (scores[:, :, None] + child_lp).view(batch, k * k)
        flat_tok = child_tok.view(batch, k * k)
        drafted.tokens.append(flat_tok)
        drafted.scores.append(cum)
        if level + 1 < shape.depth:  # EAGLE-2: expand the K best by cumulative log-probability
            scores, pick = torch.topk(cum, k, dim=-1)
            drafted.picks.append(pick)
            levels.expand(level, torch.div(pick, k, rounding_mode="floor"), feat, torch.gather(flat_tok, 1, pick))
    return _rerank(shape, buf.consts, drafted)


def _top_children(head, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs fp32, target ids) of the k most likely next tokens of each row."""
    scores, index = torch.topk(torch.log_softmax(logits, -1, dtype=torch.float32), k, dim=-1)
    return scores, target_ids(index, head.draft_vocab)


@dataclass
class _Drafted:
    """Every drafted candidate so far, level-major (a parent always has a smaller id)."""

    tokens: list[torch.Tensor]  # per level [B, n]
    scores: list[torch.Tensor]  # cumulative log-probabilities
    picks: list[torch.Tensor]  # per level 1..D-1 [B, K]: the expanded candidates, by index in their level


class _TreeKVLevels:
    """The fused head, each level on its K new nodes (module doc). Cache rows: the fed rows at
    [L, L + P), then level l's K nodes at ctx + (l-1)K + j (ctx = L + count), all past the length."""

    def __init__(self, head, buf: Eagle2Buffers):
        self.head, self.fused, self.buf, self.c = head, head.fused, buf, buf.consts

    def feed(self) -> torch.Tensor:
        """Feed the pending (target feature, next token) rows, written in place; the root's logits."""
        ids, lengths, count = self.buf.ids, self.buf.lengths, self.buf.count
        c, head = self.c, self.head
        pos = lengths[:, None] + c.steps
        pred = self.fused.forward(self.buf.feats, ids, pos, lengths, lengths, c.chain_anc, c.chain_depth,
                                  head.key, head.value)  # [B*P, H]; rows >= count land past the new length
        self.ctx = lengths + count
        self.root_feat = pred.index_select(0, torch.maximum(count + c.row_last, c.row_base))  # [B, H]
        self.pos = self.ctx[None, :, None] + c.level_pos  # [D-1, B, K]
        self.write = self.ctx[None] + c.level_write  # [D-1, B]
        return self.fused.logits(self.root_feat)

    def first(self, tokens: torch.Tensor) -> None:
        self.feats, self.tokens, self.anc = self.root_feat[:, None], tokens, self.c.anc_step[0]

    def run(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, (batch, k) = level - 1, self.tokens.shape
        pred = self.fused.forward(self.feats, self.tokens, self.pos[i], self.write[i], self.ctx, self.anc,
                                  self.c.level_depth[i], self.head.key, self.head.value)
        feat = pred.view(batch, k, -1)
        return self.fused.logits(feat), feat


class _RecomputedLevels:
    """The unfused head (module doc): level l runs on all (l)K expanded nodes, level-major, with
    their ancestor mask; a depth-d node's row sits at position ctx - 1 + d."""

    def __init__(self, head, buf: Eagle2Buffers):
        self.head, self.buf = head, buf

    def feed(self) -> torch.Tensor:
        """Feed (target feature, next token) rows and commit them; the root row's logits."""
        head = self.head
        ids, lengths, count = self.buf.ids, self.buf.lengths, self.buf.count
        batch, chain = ids.shape
        steps = torch.arange(chain, device=ids.device)
        pos = lengths[:, None] + steps[None]
        causal = (steps[None, :] <= steps[:, None]).expand(batch, chain, chain)
        logits, feat, key, value = head.forward(self.buf.feats, ids, pos, causal, lengths)
        index = pos[:, None, :, None].expand(batch, key.shape[1], chain, key.shape[3])
        head.key.scatter_(2, index, key.to(head.key.dtype))  # rows >= count land past the new length
        head.value.scatter_(2, index, value.to(head.value.dtype))
        last = (count - 1).clamp(min=0)
        rows = torch.arange(batch, device=ids.device)
        self.ctx, self.root_feat = lengths + count, feat[rows, last]
        return logits[rows, last]

    def first(self, tokens: torch.Tensor) -> None:
        shape = self.buf.shape
        batch, k = tokens.shape
        width, device = max(shape.depth - 1, 1) * k, tokens.device
        self.feats = self.root_feat.new_zeros(batch, width, self.root_feat.shape[-1])
        self.tokens, self.positions = tokens.new_zeros(batch, width), tokens.new_zeros(batch, width)
        self.ancestors = torch.zeros(batch, width, width, dtype=torch.bool, device=device)
        self.feats[:, :k] = self.root_feat[:, None]
        self.tokens[:, :k] = tokens
        self.positions[:, :k] = self.ctx[:, None]
        self.ancestors[:, :k, :k] = torch.eye(k, dtype=torch.bool, device=device)

    def run(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.buf.shape.top_k
        hi = level * k
        logits, feat, _, _ = self.head.forward(self.feats[:, :hi], self.tokens[:, :hi], self.positions[:, :hi],
                                               self.ancestors[:, :hi, :hi], self.ctx, first_logits_row=hi - k)
        return logits, feat[:, hi - k:]

    def expand(self, level: int, parent: torch.Tensor, feat: torch.Tensor, tokens: torch.Tensor) -> None:
        k = tokens.shape[1]
        lo, hi = (level - 1) * k, level * k
        new = slice(hi, hi + k)
        self.tokens[:, new] = tokens
        self.positions[:, new] = self.ctx[:, None] + level
        self.feats[:, new] = torch.gather(feat, 1, parent[..., None].expand(-1, -1, feat.shape[-1]))
        width = self.ancestors.shape[-1]
        self.ancestors[:, new] = torch.gather(self.ancestors[:, lo:hi], 1, parent[..., None].expand(-1, -1, width))
        self.ancestors[:, new, new] |= torch.eye(k, dtype=torch.bool, device=tokens.device)


def _rerank(shape: Eagle2Shape, c: _Constants, drafted: _Drafted) -> torch.Tensor:
    """The best N candidates (stable: ties keep the parent first), parents first, packed. The root
    joins the sort as ext id 0 with score 0 >= every log-probability, so it is always picked first."""
    n = shape.kept
    scores = torch.cat([c.zero_f, *drafted.scores], 1)  # [B, 1 + C]
    tokens = torch.cat([c.zero_i, *drafted.tokens], 1)
    expanded = torch.cat([c.zero_i, *drafted.picks], 1) + c.pick_base  # ext id of each expanded node
    parents = torch.gather(expanded, 1, c.parent_slot)  # [B, 1 + C] ext id of each candidate's parent
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n + 1]
    picked = torch.sort(best, dim=1).values  # ext ids ascending: the root, then parents before children
    node_of = torch.empty_like(tokens)  # only the picked entries are set, and only they are read
    node_of.scatter_(1, picked, c.node_numbers)
    parent = torch.gather(parents, 1, picked)
    own = torch.gather(scores, 1, picked) - torch.gather(scores, 1, parent)
    kept = slice(1, None)
    return torch.cat([torch.gather(tokens, 1, picked)[:, kept].float(),
                      torch.gather(node_of, 1, parent)[:, kept].float(), own[:, kept]], 1)

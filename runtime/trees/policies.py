"""Tree policies: how a drafter's candidates become the token tree the target verifies.

A tree config is a dict (a YAML preset under configs/trees/ or inline JSON):
  {policy: none}                                   plain autoregressive decoding
  {policy: widths, widths: [4, 16, 16, 16, 16]}    per level keep the top-w nodes by cumulative
                                                   drafter probability (LongSpec's 69-node tree)
  {policy: depth_branching, depth: 3, branching: 2}
  {policy: choices, choices: [[0], [1], [0, 0]]}   Medusa choice list (paths of top-k indices)
  {policy: opt, budget: 64, delta: 0.05}           OPT-Tree: the tree is the `budget` nodes with
                                                   the largest estimated acceptance probability
                                                   (product of drafter probabilities along the
                                                   path) among everything drafted so far; a new
                                                   level is drafted while it raises the expected
                                                   acceptance length by at least delta
  {policy: adaptive, budget: 32, max_width: 8}     confidence-adaptive: per level, the drafter's
                                                   top-1 probability sets the width (narrow when
                                                   confident, up to max_width when not); depth
                                                   stops once the best path's probability falls
                                                   below min_path_prob (so: deep when confident)
  {policy: auto, budget: 64}                       OPT-Tree grown to `budget`, then cut to the size
                                                   that maximises expected accepted tokens per
                                                   second on a measured verify-latency curve
                                                   (runtime/trees/auto.py)
  {policy: eagle2, depth: 6, top_k: 8, budget: 63} EAGLE-2's dynamic tree: per level the top_k
                                                   children of each of the top_k best frontier
                                                   nodes (by cumulative draft log-probability) are
                                                   drafted; after `depth` levels every drafted node
                                                   is reranked and the best `budget` are kept.
                                                   A drafter that grows such trees itself (EAGLE on
                                                   the GPU: runtime/drafters/eagle_torch.py) does,
                                                   through Drafter.draft_whole
Every policy honours `max_depth` and `budget` (total drafted nodes), and `sample_children`:
with temperature > 0 and a drafter that gives full distributions q (Medusa, draft LM), the
children of a node are drawn i.i.d. from q (tempered like the target) instead of being its top-k,
and the verifier gets q for that node (SpecInfer's multi-draft rule stays lossless). Sampled
children are never pruned after they are drawn (that would bias them), so OPT/auto do not re-rank
earlier levels in that mode.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from treespec.runtime.drafters.base import Candidates, Drafter
from treespec.runtime.trees.tree import Tree
from treespec.runtime.trees.config import (  # noqa: F401  (re-exported: the policies' public names)
    ALL_FIELDS, COMMON_FIELDS, DEFAULT_MAX_DEPTH, LOGPROB_FLOOR, POLICIES, POLICY_FIELDS, TreeConfig,
    parse_tree_config)


# -- growing trees ---------------------------------------------------------------------------------

@dataclass
class DraftedTrees:
    """What a drafting step hands to the verifier."""

    trees: list[Tree]
    # per sequence: node -> the distribution q its children were drawn from (sampled children only)
    proposals: list[dict[int, np.ndarray]]
    draft_s: float = 0.0  # seconds of drafting, the drafter's one-off work left out (Drafter.one_off_s)
    budget: int | None = None  # the node budget an `auto` step chose
    expected: list[float] = field(default_factory=list)  # per tree: sum of exp(value) of its nodes
    # draft_trees(device=True) and a drafter that leaves its trees on the device: `trees` is empty until
    # materialize() (run while the target verifies `device_tree`: TreeBackend.step_device)
    device_tree: Any = None
    pending: Callable[[], list[Tree]] | None = None
    materialize_s: float = 0.0  # seconds materialize() took (waiting for the draft, then the trees)

    def materialize(self) -> None:
        if self.pending is not None:
            t0 = time.perf_counter()
            self.trees, self.pending = self.pending(), None
            self.materialize_s = time.perf_counter() - t0


@dataclass
class _Node:
    parent: int  # index into the sequence's node records (-1 for the root)
    token: int
    logprob: float
    value: float  # cumulative log-probability root -> node: log of the estimated acceptance prob.
    depth: int
    rank: int  # position among its parent's children (top-k rank, or draw index when sampled)
    order: int  # creation order (stable tie-break)


class _Seq:
    """One sequence's growing tree: node records plus the Tree built from the selected ones."""

    def __init__(self, root: int, active: bool):
        self.records = [_Node(-1, root, 0.0, 0.0, 0, 0, 0)]
        self.selected = [0]  # record ids in the tree, parents first
        self.tree = Tree.root_only(root)
        self.node_of = {0: 0}  # record id -> tree node index
        self.frontier = [0] if active else []  # record ids to expand next
        self.proposals: dict[int, np.ndarray] = {}  # record id -> q
        self.ranks = {0: ()}
        self.pool: list[int] = []  # eagle2: every drafted record, reranked at the end

    def add(self, parent: int, token: int, logprob: float, rank: int) -> int:
        lp = _clean_logprob(logprob)
        p = self.records[parent]
        rid = len(self.records)
        self.records.append(_Node(parent, token, lp, p.value + lp, p.depth + 1, rank, rid))
        self.ranks[rid] = self.ranks[parent] + (rank,)
        return rid

    def attach(self, rid: int) -> None:
        """Append record `rid` (whose parent is in the tree) to the tree."""
        r = self.records[rid]
        self.node_of[rid] = self.tree.add(self.node_of[r.parent], r.token, r.logprob)
        self.selected.append(rid)

    def rebuild(self, keep: list[int]) -> None:
        """The tree of exactly the records `keep` (ancestor-closed), parents first, siblings by rank."""
        keep_set = set(keep) | {0}
        order = sorted(keep_set - {0}, key=lambda i: (self.records[i].depth, self.records[i].order))
        self.tree = Tree.root_only(self.records[0].token)
        self.node_of = {0: 0}
        self.selected = [0]
        for rid in order:
            assert self.records[rid].parent in self.node_of, "selection must be ancestor-closed"
            self.attach(rid)

    def drafted_values(self) -> list[float]:
        return [self.records[r].value for r in self.selected[1:]]


def _clean_logprob(lp: float) -> float:
    lp = float(lp)
    if not math.isfinite(lp):
        return LOGPROB_FLOOR
    return max(min(lp, 0.0), LOGPROB_FLOOR)


def _rank_key(node: _Node):
    """Best first; on equal value the shallower (an ancestor) first, so top-n is ancestor-closed."""
    return (-node.value, node.depth, node.order)


def build_trees(cfg: TreeConfig, drafter: Drafter | None, roots: list[int]) -> list[Tree]:
    """One tree per sequence, grown level by level from the root tokens (top-k children)."""
    return draft_trees(cfg, drafter, roots).trees


def draft_trees(cfg: TreeConfig, drafter: Drafter | None, roots: list[int], *,
                active: list[bool] | None = None, rng: np.random.Generator | None = None,
                temperature: float = 1.0, planner=None, device: bool = False) -> DraftedTrees:
    """Grow one tree per sequence. `rng` given (and cfg.sample_children): children of nodes whose
    candidates carry a distribution are drawn from it. `active[b]` False: root only.
    `planner` (auto_tree.AutoPlanner) picks the `auto` policy's node budget. `device`: the caller's
    target verifies trees on the device, so trees a drafter drafted there stay there (DraftedTrees.device_tree)."""
    t0 = time.perf_counter()
    if drafter is not None:
        drafter.one_off_s = 0.0
    active = active if active is not None else [True] * len(roots)
    seqs = [_Seq(r, a) for r, a in zip(roots, active)]
    sample = rng is not None and cfg.sample_children
    chosen = None
    whole = drafter.draft_whole(cfg, roots, active) if drafter is not None and not sample else None
    if whole is not None:
        proposals: list[dict[int, np.ndarray]] = [{} for _ in roots]
        if device and whole.device is not None:  # the `auto` planner never drafts whole trees
            return DraftedTrees([], proposals, _steady_seconds(t0, drafter), device_tree=whole.device,
                                pending=whole.trees)
        trees = whole.trees()
        # only the `auto` planner reads it, and it never drafts whole trees: none on this hot path
        expected = [float(sum(math.exp(v) for v in path_values(t)[1:])) for t in trees] if planner is not None else []
        return DraftedTrees(trees, proposals, _steady_seconds(t0, drafter), None, expected)
    if cfg.policy != "none" and drafter is not None:
        budget, levels = cfg.budget, None
        ahead = cfg.policy == "auto" and planner is not None and cfg.plan == "ahead" and not sample
        if cfg.policy == "auto" and planner is not None and sample:
            budget = chosen = planner.budget_for_sampling(cfg.budget)
        if ahead:  # sized before drafting (0 nodes: a plain step, nothing drafted)
            shape = planner.plan()
            budget, levels = shape.budget, shape.levels
            chosen = 0
        drafted_levels = _grow(cfg, drafter, seqs, budget, rng if sample else None, temperature, levels) \
            if budget > 0 else 0
        if cfg.policy == "auto" and planner is not None and (budget > 0 or not ahead):
            draft_s = _steady_seconds(t0, drafter)
            if sample:  # sampled children cannot be cut: learn the budget for the next step
                planner.observe([s.drafted_values() for s in seqs], draft_s)
            elif ahead:
                depths = [[s.records[r].depth for r in s.selected[1:]] for s in seqs]
                chosen = planner.drafted([s.drafted_values() for s in seqs], depths, draft_s, drafted_levels)
                for s in seqs:
                    s.rebuild(sorted(s.selected[1:], key=lambda i: _rank_key(s.records[i]))[:chosen])
            else:
                chosen = planner.choose([s.drafted_values() for s in seqs], draft_s)
                for s in seqs:
                    s.rebuild(sorted(s.selected[1:], key=lambda i: _rank_key(s.records[i]))[:chosen])
        if cfg.policy == "eagle2" and not sample:  # rerank every drafted node, keep the best budget
            for s in seqs:
                s.rebuild(heapq.nsmallest(budget, s.pool, key=lambda i: _rank_key(s.records[i])))
    proposals = [{s.node_of[r]: q for r, q in s.proposals.items() if r in s.node_of} for s in seqs]
    expected = [float(sum(math.exp(v) for v in s.drafted_values())) for s in seqs]
    return DraftedTrees([s.tree for s in seqs], proposals, _steady_seconds(t0, drafter), chosen, expected)


def _steady_seconds(t0: float, drafter: Drafter | None) -> float:
    """Seconds since t0, less the drafter's one-off work (what the planners price a draft at)."""
    return time.perf_counter() - t0 - (drafter.one_off_s if drafter is not None else 0.0)


def _grow(cfg: TreeConfig, drafter: Drafter, seqs: list[_Seq], budget: int,
          rng: np.random.Generator | None, temperature: float, max_levels: int | None = None) -> int:
    """Draft level by level; returns how many levels were drafted (drafter calls)."""
    levels = cfg.levels if max_levels is None else min(cfg.levels, max_levels)
    if drafter.max_depth is not None:
        levels = min(levels, drafter.max_depth)
    drafted = 0
    global_opt = cfg.policy in ("opt", "auto") and rng is None
    eagle2 = cfg.policy == "eagle2" and rng is None
    for level in range(levels):
        if not any(s.frontier for s in seqs):
            break
        trees = [s.tree for s in seqs]
        frontiers = [[s.node_of[r] for r in s.frontier] for s in seqs]
        candidates = drafter.expand(trees, frontiers)
        drafted += 1
        for s, cands in zip(seqs, candidates):
            if not s.frontier:
                continue
            cands = list(cands) + [Candidates.empty()] * (len(s.frontier) - len(cands))
            if global_opt:
                _opt_level(cfg, s, cands, budget)
            elif eagle2:
                _eagle2_level(cfg, s, cands, expand_next=level + 1 < levels)
            else:
                picked = _select(cfg, level, s, cands, budget)
                _place(s, picked, cands, rng, temperature)
    return drafted


def _options(s: _Seq, cands: list[Candidates]):
    """(value, parent rid, rank, token, logprob) for every distinct candidate of the frontier."""
    out = []
    for parent, c in zip(s.frontier, cands):
        base = s.records[parent].value
        seen = set()
        for rank in range(len(c)):
            token = int(c.tokens[rank])
            if token in seen:
                continue
            seen.add(token)
            lp = _clean_logprob(c.logprobs[rank])
            out.append((base + lp, parent, rank, token, lp))
    return out


def _select(cfg: TreeConfig, level: int, s: _Seq, cands: list[Candidates], budget: int):
    """Options to add at this level for the incremental policies (nothing already placed moves)."""
    remaining = budget - (len(s.tree) - 1)
    options = _options(s, cands)
    if remaining <= 0 or not options:
        return []
    best_first = lambda o: (-o[0], o[2])  # noqa: E731
    if cfg.policy == "choices":
        wanted = {tuple(c) for c in cfg.choices if len(c) == level + 1}
        picked = [o for o in options if s.ranks[o[1]] + (o[2],) in wanted]
    elif cfg.policy == "depth_branching":
        picked = [o for o in options if o[2] < cfg.branching]
    elif cfg.policy == "widths":
        picked = heapq.nsmallest(cfg.widths[level], options, key=best_first)
    elif cfg.policy == "eagle2":  # sampled children: the top_k best per level, never pruned
        picked = heapq.nsmallest(cfg.top_k, options, key=best_first)
    elif cfg.policy == "adaptive":
        width = adaptive_width(cfg, s, cands)
        picked = heapq.nsmallest(width, options, key=best_first)
        if picked and math.exp(picked[0][0]) < cfg.min_path_prob:
            picked = []  # the best path is already unlikely: stop deepening
    else:  # opt / auto with sampled children: greedy per level, no re-ranking of placed nodes
        picked = heapq.nsmallest(remaining, options, key=best_first)
        if sum(math.exp(o[0]) for o in picked) < cfg.delta:
            picked = []
    return sorted(picked, key=best_first)[:remaining]


def adaptive_width(cfg: TreeConfig, s: _Seq, cands: list[Candidates]) -> int:
    """Width of the next level from the drafter's top-1 probability at the most likely frontier
    node: min_width at or above `confident`, max_width at or below `unsure`, linear between."""
    scored = [(s.records[r].value, c) for r, c in zip(s.frontier, cands) if len(c)]
    if not scored:
        return cfg.min_width
    _, best = max(scored, key=lambda t: t[0])
    top1 = math.exp(_clean_logprob(float(np.max(best.logprobs))))
    if top1 >= cfg.confident:
        return cfg.min_width
    if top1 <= cfg.unsure:
        return cfg.max_width
    frac = (cfg.confident - top1) / (cfg.confident - cfg.unsure)
    return int(round(cfg.min_width + frac * (cfg.max_width - cfg.min_width)))


def _place(s: _Seq, picked, cands: list[Candidates], rng: np.random.Generator | None,
           temperature: float) -> None:
    """Add the picked options; in sampling mode a parent's picked count is filled with i.i.d.
    draws from its distribution instead (its slots were chosen before seeing any draw)."""
    by_parent: dict[int, list] = {}
    for o in picked:
        by_parent.setdefault(o[1], []).append(o)
    dists = {parent: c.distribution for parent, c in zip(s.frontier, cands)}
    new = []
    for parent in s.frontier:  # parent order, then best first within a parent
        opts = by_parent.get(parent)
        if not opts:
            continue
        dist = dists.get(parent)
        if rng is not None and dist is not None:
            q = proposal_distribution(dist, temperature)
            cdf = np.cumsum(q)
            draws = np.searchsorted(cdf, rng.random(len(opts)) * cdf[-1], side="right")
            draws = np.minimum(draws, len(q) - 1).tolist()
            with np.errstate(divide="ignore"):
                logq = np.log(q[draws]).tolist()
            s.proposals[parent] = q
            for i, (token, lp) in enumerate(zip(draws, logq)):
                new.append(s.add(parent, token, lp, i))
        else:
            for o in sorted(opts, key=lambda o: o[2]):
                new.append(s.add(parent, o[3], o[4], o[2]))
    for rid in new:
        s.attach(rid)
    s.frontier = new


def proposal_distribution(dist: np.ndarray, temperature: float) -> np.ndarray:
    """The drafter's distribution tempered like the target's (any q is lossless; a closer one is
    accepted more often). float64, sums to 1; the children are drawn from exactly this array and
    the verifier is handed the same array."""
    q = np.asarray(dist, dtype=np.float64).reshape(-1)
    tempered = temperature > 0 and temperature != 1.0
    if not tempered and q.min() >= 0 and abs(q.sum() - 1.0) < 1e-9:  # common case: already clean
        return q
    q = np.where(np.isfinite(q) & (q > 0), q, 0.0)
    if tempered and q.max() > 0:
        with np.errstate(divide="ignore"):
            logq = np.log(q) / temperature
        q = np.exp(logq - logq.max())
    total = q.sum()
    if total <= 0:
        return np.full(q.shape, 1.0 / q.size)
    return q / total


def _opt_level(cfg: TreeConfig, s: _Seq, cands: list[Candidates], budget: int) -> None:
    """OPT-Tree, one level: draft the frontier's children, then the tree becomes the `budget`
    records with the highest value among the tree so far and the new children (ancestor-closed,
    since a child's value never exceeds its parent's). Keep it only if the expected acceptance
    length sum(exp(value)) rises by at least delta; the frontier is the newly kept level."""
    options = _options(s, cands)
    if not options:
        s.frontier = []
        return
    before = sum(math.exp(v) for v in s.drafted_values())
    mark = len(s.records)
    for _, parent, rank, token, lp in options:
        s.add(parent, token, lp, rank)
    pool = s.selected[1:] + list(range(mark, len(s.records)))
    keep = heapq.nsmallest(budget, pool, key=lambda i: _rank_key(s.records[i]))
    after = sum(math.exp(s.records[i].value) for i in keep)
    new = [i for i in keep if i >= mark]
    if not new or after - before < cfg.delta:
        del s.records[mark:]
        s.frontier = []
        return
    s.rebuild(keep)
    s.frontier = sorted(new, key=lambda i: (s.node_of[s.records[i].parent], s.records[i].rank))


def _eagle2_level(cfg: TreeConfig, s: _Seq, cands: list[Candidates], expand_next: bool) -> None:
    """EAGLE-2, one level: the top_k children of every frontier node join the pool of drafted
    records; the top_k best of them by cumulative log-probability join the tree (the drafter needs
    them there to expand them) and form the next frontier."""
    mark = len(s.records)
    for _, parent, rank, token, lp in _options(s, cands):
        if rank < cfg.top_k:
            s.add(parent, token, lp, rank)
    new = list(range(mark, len(s.records)))
    s.pool += new
    best = heapq.nsmallest(cfg.top_k, new, key=lambda i: _rank_key(s.records[i])) if expand_next else []
    best.sort(key=lambda i: (s.node_of[s.records[i].parent], s.records[i].rank))
    for rid in best:
        s.attach(rid)
    s.frontier = best


def path_values(tree: Tree) -> list[float]:
    """Each node's cumulative log-probability from the root (root 0): its `value`."""
    values = [0.0] * len(tree)
    for node in range(1, len(tree)):
        values[node] = values[tree.parents[node]] + tree.logprobs[node]
    return values


def expected_accepted(values: list[float]) -> float:
    """OPT-Tree's estimate of tokens per step for a tree: the bonus token plus, per drafted node,
    the probability that its whole path is accepted (product of drafter probabilities)."""
    return 1.0 + float(sum(math.exp(v) for v in values))


"""Tree policies: how a drafter's candidates become the token tree the target verifies.

A tree config is a dict (a YAML preset under configs/trees/ or inline JSON):
  {policy: none}                                   plain autoregressive decoding
  {policy: widths, widths: [4, 16, 16, 16, 16]}    per level keep the top-w nodes by cumulative
                                                   drafter probability (LongSpec's 69-node tree)
  {policy: depth_branching, depth: 3, branching: 2}
  {policy: choices, choices: [[0], [1], [0, 0]]}   Medusa choice list (paths of top-k indices)
  {policy: opt, budget: 64, delta: 0.05}           OPT-Tree: per level add the nodes with the
                                                   largest estimated acceptance probability, under
                                                   a node budget, until the gain drops below delta
Every policy also honours `max_depth` (default 8) and `budget` (total drafted nodes, default 64).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

from treespec.runtime.drafters.base import Drafter
from treespec.runtime.errors import InputError
from treespec.runtime.tree import Tree

POLICIES = ("none", "widths", "depth_branching", "choices", "opt")


@dataclass
class TreeConfig:
    policy: str = "none"
    widths: list[int] = field(default_factory=list)
    depth: int = 0
    branching: int = 0
    choices: list[list[int]] = field(default_factory=list)
    budget: int = 64
    delta: float = 0.0
    max_depth: int = 8

    @property
    def max_nodes(self) -> int:
        """Upper bound on tree size, root included (sizes the graph profile)."""
        if self.policy == "none":
            return 1
        if self.policy == "widths":
            return 1 + min(sum(self.widths), self.budget)
        if self.policy == "depth_branching":
            return 1 + min(sum(self.branching ** d for d in range(1, self.depth + 1)), self.budget)
        if self.policy == "choices":
            return 1 + len(self.choices)
        return 1 + self.budget

    @property
    def levels(self) -> int:
        if self.policy == "widths":
            return len(self.widths)
        if self.policy == "depth_branching":
            return self.depth
        if self.policy == "choices":
            return max((len(c) for c in self.choices), default=0)
        return 0 if self.policy == "none" else self.max_depth


def _positive_int(raw: dict, key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"tree config: '{key}' must be a positive integer, got {value!r}")
    return value


def parse_tree_config(raw: Any) -> TreeConfig:
    """Validate a tree config dict; every problem is an InputError naming the field."""
    if raw is None or raw == "none":
        return TreeConfig()
    if not isinstance(raw, dict):
        raise InputError(f"tree config must be a mapping, got {type(raw).__name__}")
    policy = raw.get("policy")
    if policy not in POLICIES:
        raise InputError(f"tree config: unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    unknown = set(raw) - {"policy", "widths", "depth", "branching", "choices", "budget", "delta",
                          "max_depth", "name", "description"}
    if unknown:
        raise InputError(f"tree config: unknown field(s) {', '.join(sorted(unknown))}")
    cfg = TreeConfig(policy=policy)
    cfg.max_depth = _positive_int(raw, "max_depth", 8)
    cfg.budget = _positive_int(raw, "budget", 64)
    if policy == "widths":
        widths = raw.get("widths")
        if not isinstance(widths, list) or not widths:
            raise InputError("tree config: 'widths' must be a non-empty list of positive integers")
        cfg.widths = [_positive_int({"widths": w}, "widths") for w in widths]
        cfg.budget = int(raw.get("budget", sum(cfg.widths)))
    elif policy == "depth_branching":
        cfg.depth = _positive_int(raw, "depth")
        cfg.branching = _positive_int(raw, "branching")
        cfg.budget = int(raw.get("budget", sum(cfg.branching ** d for d in range(1, cfg.depth + 1))))
    elif policy == "choices":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise InputError("tree config: 'choices' must be a non-empty list of index paths")
        seen = set()
        for path in choices:
            if (not isinstance(path, list) or not path
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in path)):
                raise InputError(f"tree config: choice {path!r} must be a non-empty list of indices >= 0")
            seen.add(tuple(path))
        for path in seen:
            if len(path) > 1 and path[:-1] not in seen:
                raise InputError(f"tree config: choice {list(path)} has no parent {list(path[:-1])}")
        cfg.choices = sorted((list(p) for p in seen), key=lambda p: (len(p), p))
    elif policy == "opt":
        delta = raw.get("delta", 0.0)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or delta < 0:
            raise InputError(f"tree config: 'delta' must be a number >= 0, got {delta!r}")
        cfg.delta = float(delta)
    return cfg


def build_trees(cfg: TreeConfig, drafter: Drafter | None, roots: list[int]) -> list[Tree]:
    """One tree per sequence, grown level by level from the root tokens."""
    trees = [Tree.root_only(r) for r in roots]
    if cfg.policy == "none" or drafter is None:
        return trees
    levels = cfg.levels
    if drafter.max_depth is not None:
        levels = min(levels, drafter.max_depth)
    frontiers = [[0] for _ in trees]
    cum = [[0.0] for _ in trees]  # cumulative drafter log-prob per node
    rank_paths: list[list[tuple[int, ...]]] = [[()] for _ in trees]  # top-k ranks root -> node
    for level in range(levels):
        if not any(frontiers):
            break
        candidates = drafter.expand(trees, frontiers)
        for b, tree in enumerate(trees):
            picked = _select(cfg, level, tree, frontiers[b], candidates[b], cum[b], rank_paths[b])
            new_frontier = []
            for parent, token, logprob, rank in picked:
                node = tree.add(parent, token, logprob)
                cum[b].append(cum[b][parent] + logprob)
                rank_paths[b].append(rank_paths[b][parent] + (rank,))
                new_frontier.append(node)
            frontiers[b] = new_frontier
    return trees


def _select(cfg: TreeConfig, level: int, tree: Tree, frontier: list[int], candidates, cum, rank_paths):
    """(parent, token, logprob, rank) to add at this level."""
    remaining = cfg.budget - (len(tree) - 1)
    if remaining <= 0:
        return []
    options = []  # (score, parent, rank, token, logprob)
    for parent, cands in zip(frontier, candidates):
        for rank in range(len(cands)):
            logprob = float(cands.logprobs[rank])
            options.append((cum[parent] + logprob, parent, rank, int(cands.tokens[rank]), logprob))
    if cfg.policy == "choices":
        wanted = {tuple(c) for c in cfg.choices if len(c) == level + 1}
        picked = [o for o in options if rank_paths[o[1]] + (o[2],) in wanted]
    elif cfg.policy == "depth_branching":
        picked = [o for o in options if o[2] < cfg.branching]
    elif cfg.policy == "widths":
        picked = heapq.nlargest(cfg.widths[level], options, key=lambda o: o[0])
    else:  # opt
        picked = heapq.nlargest(remaining, options, key=lambda o: o[0])
        gain = sum(math.exp(o[0]) for o in picked)
        if gain < cfg.delta:
            return []
    picked = sorted(picked, key=lambda o: -o[0])[:remaining]
    # Children are added in parent order and, within a parent, best first (sampling verification
    # tries siblings in this order).
    picked.sort(key=lambda o: (frontier.index(o[1]), o[2]))
    return [(o[1], o[3], o[4], o[2]) for o in picked]

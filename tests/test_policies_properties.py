"""Property tests (hypothesis) for tree construction: every policy, random drafter outputs.

The drafter here is a test double of a drafter's OUTPUT only (random Candidates per node, with or
without a full distribution); no model is involved. Properties, for every policy, deterministic
(top-k) and sampled children, batches with inactive sequences:
  * parents before children, depths consistent, children lists consistent, the attention mask is
    exactly the ancestor-or-self relation, batch padding sees only itself;
  * the node budget, max_nodes, the depth bound and the policy's own bounds are respected;
  * top-k children are candidates the drafter proposed for that very path, distinct per parent;
    sampled children have q > 0 under the proposal handed to the verifier;
  * OPT-Tree keeps the nodes of largest estimated acceptance probability (no excluded candidate
    of a kept node beats a kept node when the budget is full).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treespec.runtime.trees.auto import AutoPlanner, LatencyCurve
from treespec.runtime.drafters.base import Candidates, Drafter
from treespec.errors import InputError
from treespec.runtime.trees.policies import (POLICIES, TreeConfig, build_trees, draft_trees, parse_tree_config,
                                       proposal_distribution)
from treespec.runtime.trees.tree import Tree
from support.tree_checks import assert_batch_inputs, assert_tree_structure

PROPS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
VOCAB = 40


class RandomDrafter(Drafter):
    """Random candidates per node (a fixed function of the node's path and a seed)."""

    kind = "fake"

    def __init__(self, seed: int, top_k: int = 5, with_dist: bool = False, max_depth: int | None = None,
                 empty_rate: float = 0.1, peak: float | None = None):
        self.seed, self.top_k, self.with_dist, self.max_depth = seed, top_k, with_dist, max_depth
        self.empty_rate, self.peak = empty_rate, peak
        self.proposed: dict[tuple, Candidates] = {}

    def reset(self, contexts, capacity):
        self.contexts = [tuple(c) for c in contexts]

    def accept(self, b, new_tokens, target_hidden):
        pass

    def _for_path(self, path: tuple) -> Candidates:
        rng = np.random.default_rng(abs(hash((self.seed,) + path)) % (1 << 32))
        if rng.random() < self.empty_rate:
            return Candidates.empty()
        if self.peak is not None:  # a drafter with a given top-1 probability
            q = np.full(VOCAB, (1 - self.peak) / (VOCAB - 1))
            q[rng.integers(VOCAB)] = self.peak
        else:
            q = rng.dirichlet(np.full(VOCAB, rng.choice([0.05, 0.3, 1.0])))
        k = int(rng.integers(1, self.top_k + 1))
        top = np.argsort(-q, kind="stable")[:k]
        lp = np.log(np.maximum(q[top], 1e-300))
        return Candidates(top.astype(np.int64), lp, q if self.with_dist else None)

    def expand(self, trees, frontiers):
        out = []
        for b, (tree, frontier) in enumerate(zip(trees, frontiers)):
            row = []
            for node in frontier:
                path = (b,) + tuple(tree.tokens[n] for n in tree.path_to(node))
                if self.max_depth is not None and tree.depths[node] >= self.max_depth:
                    row.append(Candidates.empty())
                    continue
                self.proposed[path] = c = self._for_path(path)
                row.append(c)
            out.append(row)
        return out


@st.composite
def tree_configs(draw):
    policy = draw(st.sampled_from(POLICIES))
    raw: dict = {"policy": policy}
    if policy == "widths":
        raw["widths"] = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
    elif policy == "depth_branching":
        raw["depth"] = draw(st.integers(1, 4))
        raw["branching"] = draw(st.integers(1, 3))
    elif policy == "choices":
        paths = draw(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=5), min_size=1, max_size=10))
        raw["choices"] = sorted({tuple(p[:n]) for p in paths for n in range(1, len(p) + 1)})
        raw["choices"] = [list(c) for c in raw["choices"]]
    elif policy in ("opt", "auto"):
        raw["delta"] = draw(st.sampled_from([0.0, 0.0, 0.02, 0.2, 1.0]))
    elif policy == "adaptive":
        lo = draw(st.floats(0.0, 0.7))
        raw.update(unsure=lo, confident=draw(st.floats(lo + 0.05, 1.0)),
                   max_width=draw(st.integers(1, 10)), min_path_prob=draw(st.sampled_from([0.0, 0.01, 0.1])))
        raw["min_width"] = draw(st.integers(1, raw["max_width"]))
    elif policy == "eagle2":
        raw.update(depth=draw(st.integers(1, 5)), top_k=draw(st.integers(1, 6)))
    if policy != "none" and draw(st.booleans()):
        raw["budget"] = draw(st.integers(1, 70))
    if policy != "none" and draw(st.booleans()):
        raw["max_depth"] = draw(st.integers(1, 9))
    raw["sample_children"] = draw(st.booleans())
    return raw


def check_tree(tree: Tree, cfg: TreeConfig, drafter_depth: int | None) -> None:
    n = len(tree)
    assert_tree_structure(tree)
    for i in range(1, n):
        assert math.isfinite(tree.logprobs[i]) and tree.logprobs[i] <= 0
    assert n - 1 <= cfg.budget and n <= cfg.max_nodes
    depth = max(tree.depths)
    assert depth <= cfg.levels and depth <= cfg.max_depth
    if drafter_depth is not None:
        assert depth <= drafter_depth
    per_level = np.bincount(tree.depths, minlength=depth + 1)
    if cfg.policy == "none":
        assert n == 1
    elif cfg.policy == "widths":
        assert all(per_level[d] <= cfg.widths[d - 1] for d in range(1, depth + 1))
    elif cfg.policy == "depth_branching":
        assert all(len(kids) <= cfg.branching for kids in tree.children) and depth <= cfg.depth
    elif cfg.policy == "choices":
        lengths = [len(c) for c in cfg.choices]
        assert all(per_level[d] <= lengths.count(d) for d in range(1, depth + 1))
    elif cfg.policy == "adaptive":
        assert all(per_level[d] <= cfg.max_width for d in range(1, depth + 1))


def check_batch(trees: list[Tree]) -> None:
    assert_batch_inputs(trees, np.array([5 * b + 1 for b in range(len(trees))], dtype=np.int64))


def rank_paths(tree: Tree, drafter: RandomDrafter, b: int) -> list[tuple]:
    """Per node, the top-k ranks root -> node (deterministic children only)."""
    ranks: list[tuple] = [()]
    for i in range(1, len(tree)):
        parent = tree.parents[i]
        cands = drafter.proposed[(b,) + tuple(tree.tokens[n] for n in tree.path_to(parent))]
        rank = int(np.flatnonzero(cands.tokens == tree.tokens[i])[0])
        ranks.append(ranks[parent] + (rank,))
    return ranks


@PROPS
@given(raw=tree_configs(), seed=st.integers(0, 10 ** 6), batch=st.integers(1, 3),
       with_dist=st.booleans(), medusa_depth=st.sampled_from([None, None, 1, 3]),
       inactive=st.integers(0, 7))
def test_every_policy_builds_valid_trees(raw, seed, batch, with_dist, medusa_depth, inactive):
    cfg = parse_tree_config(raw)
    drafter = RandomDrafter(seed, with_dist=with_dist, max_depth=medusa_depth)
    drafter.reset([[1]] * batch, 64)
    active = [not (inactive >> b) & 1 for b in range(batch)]
    rng = np.random.default_rng(seed) if cfg.sample_children else None
    roots = [int(r) for r in np.random.default_rng(seed).integers(0, VOCAB, batch)]
    drafted = draft_trees(cfg, drafter, roots, active=active, rng=rng, temperature=0.7)
    assert len(drafted.trees) == batch
    check_batch(drafted.trees)
    for b, (tree, proposals) in enumerate(zip(drafted.trees, drafted.proposals)):
        assert tree.tokens[0] == roots[b]
        check_tree(tree, cfg, medusa_depth)
        if not active[b]:
            assert len(tree) == 1
        sampled = set(proposals)
        assert not sampled or (rng is not None and with_dist), "proposals only for sampled children"
        for node, q in proposals.items():
            assert tree.children[node], "a proposal belongs to a node with children"
            assert abs(q.sum() - 1) < 1e-9 and (q >= 0).all()
            assert all(q[tree.tokens[c]] > 0 for c in tree.children[node])
        for node in range(len(tree)):
            kids = tree.children[node]
            if node in sampled or not kids:
                continue
            cands = drafter.proposed[(b,) + tuple(tree.tokens[n] for n in tree.path_to(node))]
            tokens = [tree.tokens[c] for c in kids]
            assert len(set(tokens)) == len(tokens), "top-k siblings are distinct"
            assert set(tokens) <= set(cands.tokens.tolist()), "children are the drafter's candidates"
            if cfg.policy == "depth_branching":
                assert all(int(np.flatnonzero(cands.tokens == t)[0]) < cfg.branching for t in tokens)
        if cfg.policy == "choices" and not sampled:
            assert set(rank_paths(tree, drafter, b)[1:]) <= {tuple(c) for c in cfg.choices}


@PROPS
@given(seed=st.integers(0, 10 ** 6), budget=st.integers(1, 60), max_depth=st.integers(1, 8))
def test_opt_tree_keeps_the_most_likely_nodes(seed, budget, max_depth):
    """OPT-Tree with delta 0: the tree is the top-`budget` nodes by product of drafter
    probabilities: a candidate of a kept node that was left out never beats a kept node, and one
    is left out only when the budget is full."""
    cfg = parse_tree_config({"policy": "opt", "budget": budget, "max_depth": max_depth, "delta": 0.0})
    drafter = RandomDrafter(seed, empty_rate=0.0)
    drafter.reset([[1]], 64)
    tree = build_trees(cfg, drafter, [3])[0]
    check_tree(tree, cfg, None)
    value = [tree.cumulative_logprob(i) for i in range(len(tree))]
    weakest = min(value[1:], default=0.0)
    for node in range(len(tree)):
        if tree.depths[node] >= max_depth:
            continue
        path = (0,) + tuple(tree.tokens[n] for n in tree.path_to(node))
        if path not in drafter.proposed:
            assert len(tree) - 1 == budget or node == 0, "an unexpanded node while budget is left"
            continue
        cands = drafter.proposed[path]
        kept = {tree.tokens[c] for c in tree.children[node]}
        for token, lp in zip(cands.tokens.tolist(), cands.logprobs.tolist()):
            if token not in kept:
                assert len(tree) - 1 == budget, "a candidate was dropped although budget was left"
                assert value[node] + lp <= weakest + 1e-9, "a dropped candidate beats a kept node"


def test_opt_prefers_a_likely_deep_path_to_unlikely_siblings():
    """The per-level greedy version took all 5 root candidates; OPT-Tree takes the likely chain."""

    class Chain(Drafter):
        kind = "chain"

        def reset(self, contexts, capacity):
            pass

        def accept(self, b, new_tokens, target_hidden):
            pass

        def expand(self, trees, frontiers):
            lp = np.log([0.9, 0.025, 0.025, 0.025, 0.025])
            return [[Candidates(np.arange(10, 15) + trees[0].depths[n], lp) for n in f] for f in frontiers]

    tree = build_trees(parse_tree_config({"policy": "opt", "budget": 5, "max_depth": 8}), Chain(), [1])[0]
    assert tree.parents == [-1, 0, 1, 2, 3, 4]  # a chain of five 0.9-nodes (0.9^5 = 0.59 > 0.025)


@pytest.mark.parametrize("peak,expect_wide", [(0.97, False), (0.15, True)])
def test_adaptive_narrow_deep_when_confident_wide_shallow_when_not(peak, expect_wide):
    cfg = parse_tree_config({"policy": "adaptive", "budget": 40, "max_depth": 8, "max_width": 6,
                             "confident": 0.8, "unsure": 0.3, "min_path_prob": 0.05})
    drafter = RandomDrafter(1, top_k=6, empty_rate=0.0, peak=peak)
    drafter.reset([[1]], 64)
    tree = build_trees(cfg, drafter, [2])[0]
    per_level = np.bincount(tree.depths)
    if expect_wide:
        assert per_level[1] == 6 and max(tree.depths) <= 2
    else:
        assert max(per_level[1:]) == 1 and max(tree.depths) == 8


def test_auto_planner_maximises_expected_tokens_per_second():
    values = [np.log([0.9, 0.8, 0.5, 0.3, 0.1, 0.05, 0.01]).tolist()]
    flat = LatencyCurve([1, 64], [0.01, 0.01])
    steep = LatencyCurve([1, 2, 64], [0.01, 0.02, 0.64])
    assert AutoPlanner(flat, 64).choose(values, 0.0) == 7  # verifying more is free: keep all
    n = AutoPlanner(steep, 64).choose(values, 0.0)
    e = 1 + np.concatenate([[0], np.cumsum(np.exp(values[0]))])
    rate = [e[k] / steep(k + 1) for k in range(8)]
    assert n == int(np.argmax(rate)) and n < 7
    # a slow drafter makes verification relatively cheap: bigger trees pay off
    assert AutoPlanner(steep, 64).choose(values, 1.0) >= n


def test_auto_planner_calibrates_an_overconfident_drafter():
    """When far fewer drafted tokens are accepted than the path probabilities predict, the
    planner scales its estimate down and picks smaller trees; it recovers when they are."""
    values = [np.log([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]).tolist()]
    curve = LatencyCurve([1, 8], [0.010, 0.017])
    planner = AutoPlanner(curve, 64)
    trusting = planner.choose(values, 0.0)
    for _ in range(30):
        planner.record(predicted=4.2, accepted=0)
    assert planner.calibration < 0.1 and planner.choose(values, 0.0) < trusting
    for _ in range(60):
        planner.record(predicted=4.2, accepted=4)
    assert planner.calibration > 0.9 and planner.choose(values, 0.0) == trusting


def test_auto_cuts_the_tree_to_the_chosen_budget():
    cfg = parse_tree_config({"policy": "auto", "budget": 30})
    drafter = RandomDrafter(7, empty_rate=0.0)
    drafter.reset([[1], [1]], 64)
    planner = AutoPlanner(LatencyCurve([1, 2, 4, 31], [0.001, 0.002, 0.004, 0.5]), 30)
    drafted = draft_trees(cfg, drafter, [1, 2], planner=planner)
    assert drafted.budget == planner.history[-1]
    for tree in drafted.trees:
        check_tree(tree, cfg, None)
        assert len(tree) - 1 <= drafted.budget
    # sampled children are never cut after drawing: the budget applies from the next step on
    sampler = RandomDrafter(7, empty_rate=0.0, with_dist=True)
    sampler.reset([[1]], 64)
    cfg_s = parse_tree_config({"policy": "auto", "budget": 30, "sample_children": True})
    rng = np.random.default_rng(0)
    planner.next_budget = None
    first = draft_trees(cfg_s, sampler, [1], rng=rng, planner=planner)
    assert first.budget == 30 and len(first.trees[0]) - 1 <= 30
    learnt = planner.next_budget
    assert learnt is not None and 1 <= learnt <= 30
    second = draft_trees(cfg_s, sampler, [1], rng=rng, planner=planner)
    assert second.budget == learnt and len(second.trees[0]) - 1 <= learnt


def test_proposal_distribution_tempers_and_normalises():
    q = np.array([0.5, 0.25, 0.25, 0.0])
    assert np.allclose(proposal_distribution(q, 1.0), q)
    cold = proposal_distribution(q, 0.5)
    assert np.allclose(cold, np.array([0.25, 0.0625, 0.0625, 0]) / 0.375) and cold[3] == 0


@pytest.mark.parametrize("raw,message", [
    ({"policy": "adaptive", "max_width": 0}, "'max_width' must be a positive integer"),
    ({"policy": "adaptive", "min_width": 5, "max_width": 2}, "'min_width' \\(5\\) is over"),
    ({"policy": "adaptive", "confident": 0.2, "unsure": 0.5}, "'unsure' \\(0.5\\) must be below"),
    ({"policy": "adaptive", "min_path_prob": 1.5}, "'min_path_prob' must be a number in \\[0, 1\\]"),
    ({"policy": "auto", "delta": float("nan")}, "'delta' must be a number >= 0"),
    ({"policy": "opt", "sample_children": "yes"}, "'sample_children' must be true or false"),
    ({"policy": "auto", "budget": 0}, "'budget' must be a positive integer"),
])
def test_new_fields_are_validated(raw, message):
    with pytest.raises(InputError, match=message):
        parse_tree_config(raw)


def test_every_preset_parses():
    from treespec.runtime.trees.presets import load_tree_preset, preset_names

    names = preset_names()
    assert {"adaptive", "auto", "opt32", "longspec", "binary3", "medusa-default", "opt-sampled"} <= set(names)
    policies = {parse_tree_config(load_tree_preset(n)).policy for n in names}
    assert policies == set(POLICIES) - {"none"}

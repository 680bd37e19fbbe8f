"""Assertions on trees and on the batched tree tensors, shared by the property and fuzz tests, and
one small tree config per policy for the lossless tests (small sizes: the CPU budget)."""
from __future__ import annotations

import numpy as np

from treespec.runtime.trees.tree import Tree, batch_tree_inputs

POLICY_TREES: dict[str, str | dict] = {
    "widths": {"policy": "widths", "widths": [3, 3, 2, 2]},
    "depth_branching": "binary3",
    "choices": "medusa-default",
    "opt": {"policy": "opt", "budget": 16, "delta": 0.0, "max_depth": 6},
    "adaptive": {"policy": "adaptive", "budget": 16, "max_width": 4, "max_depth": 6, "min_path_prob": 0.0},
    "auto": {"policy": "auto", "budget": 16, "max_depth": 6},
}


def assert_tree_structure(tree: Tree) -> None:
    """Parents before children, consistent depths and children lists, mask = ancestor-or-self."""
    n = len(tree)
    tree.validate()
    assert len(tree.tokens) == len(tree.parents) == len(tree.depths) == len(tree.logprobs) == len(tree.children)
    assert n >= 1 and tree.parents[0] == -1 and tree.depths[0] == 0
    for i in range(1, n):
        p = tree.parents[i]
        assert 0 <= p < i, "parents come before their children"
        assert tree.depths[i] == tree.depths[p] + 1
        assert i in tree.children[p]
    assert sorted(c for kids in tree.children for c in kids) == list(range(1, n))
    want = np.zeros((n, n), dtype=bool)
    for i in range(n):
        want[i, tree.path_to(i)] = True
    assert (tree.ancestor_mask() == want).all(), "mask must be exactly the ancestor-or-self relation"


def assert_batch_inputs(trees: list[Tree], past: np.ndarray):
    """batch_tree_inputs of ragged trees: each tree's ids, positions and mask in place, padding
    rows visible only to themselves. Returns (ids, positions, mask)."""
    ids, pos, mask = batch_tree_inputs(trees, past)
    width = max(len(t) for t in trees)
    for b, tree in enumerate(trees):
        n = len(tree)
        assert (ids[b, :n] == tree.tokens).all()
        assert (pos[b, :n] == past[b] + np.asarray(tree.depths)).all()
        assert (mask[b, :n, :n] == tree.ancestor_mask()).all()
        assert not mask[b, :n, n:].any() and not mask[b, n:, :n].any()
        assert (mask[b, n:, n:] == np.eye(width - n, dtype=bool)).all()
    return ids, pos, mask

"""A token tree and the tensors that describe it to a tree graph.

Node 0 is the root: the last accepted token, whose K/V is not in the cache yet. Every other node
is a drafted token; parents always come before their children.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Tree:
    tokens: list[int]
    parents: list[int]  # parents[0] == -1
    logprobs: list[float] = field(default_factory=list)  # drafter log-prob of each node (root 0)
    depths: list[int] = field(default_factory=list)
    children: list[list[int]] = field(default_factory=list)

    @classmethod
    def root_only(cls, token: int) -> "Tree":
        return cls(tokens=[token], parents=[-1], logprobs=[0.0], depths=[0], children=[[]])

    def __post_init__(self) -> None:
        if not self.logprobs:
            self.logprobs = [0.0] * len(self.tokens)
        if not self.depths or not self.children:
            self.depths = [0] * len(self.tokens)
            self.children = [[] for _ in self.tokens]
            for i in range(1, len(self.tokens)):
                p = self.parents[i]
                self.depths[i] = self.depths[p] + 1
                self.children[p].append(i)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, logprob: float = 0.0) -> int:
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.logprobs.append(logprob)
        self.depths.append(self.depths[parent] + 1)
        self.children.append([])
        self.children[parent].append(node)
        return node

    def child_with_token(self, node: int, token: int) -> int | None:
        for child in self.children[node]:
            if self.tokens[child] == token:
                return child
        return None

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root down to `node`, both included."""
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def cumulative_logprob(self, node: int) -> float:
        return float(sum(self.logprobs[n] for n in self.path_to(node)))

    def ancestor_mask(self) -> np.ndarray:
        """bool [T, T]: mask[i, j] = j is i or an ancestor of i."""
        # One fancy-indexed OR per level, not one per node (a 64-node tree verifies every step):
        # after pass d, row i holds i's ancestors up to d levels up (the root is its own parent).
        parents = np.maximum(np.asarray(self.parents, dtype=np.int64), 0)
        mask = np.eye(len(self.tokens), dtype=np.bool_)
        for _ in range(max(self.depths)):
            mask |= mask[parents]
        return mask

    def validate(self) -> None:
        assert self.parents[0] == -1, "node 0 must be the root"
        for i in range(1, len(self.tokens)):
            assert 0 <= self.parents[i] < i, f"node {i}: parent {self.parents[i]} must come before it"


def chain_tree(tokens: list[int]) -> Tree:
    """A path: how a prompt (or several accepted tokens) is fed as one step."""
    return Tree(tokens=list(tokens), parents=[-1] + list(range(len(tokens) - 1)))


def batch_tree_inputs(trees: list[Tree], past_lengths: np.ndarray, pad_token: int = 0):
    """Pad ragged trees to one [B, T] step. Padding nodes see only themselves."""
    width = max(len(t) for t in trees)
    batch = len(trees)
    input_ids = np.full((batch, width), pad_token, dtype=np.int64)
    position_ids = np.zeros((batch, width), dtype=np.int64)
    tree_mask = np.zeros((batch, width, width), dtype=np.bool_)
    for b, tree in enumerate(trees):
        n = len(tree)
        input_ids[b, :n] = tree.tokens
        position_ids[b, :n] = int(past_lengths[b]) + np.asarray(tree.depths)
        position_ids[b, n:] = int(past_lengths[b])
        tree_mask[b, :n, :n] = tree.ancestor_mask()
        idx = np.arange(n, width)
        tree_mask[b, idx, idx] = True
    return input_ids, position_ids, tree_mask

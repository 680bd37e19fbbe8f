"""The drafter interface: propose candidate children for nodes of a growing token tree.

Tree policies (runtime/trees/policies.py) decide which candidates become nodes; drafters only say what
could come next and how likely they think it is. `expand` is batched over sequences so that a
draft model runs one forward per tree level for the whole batch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from treespec.runtime.trees.tree import Tree


@dataclass
class Candidates:
    """Children proposed for one node, best first."""

    tokens: np.ndarray  # int64 [k]
    logprobs: np.ndarray  # float [k], the drafter's log-probabilities
    distribution: np.ndarray | None = None  # full q over the vocabulary, when the drafter has one

    @classmethod
    def empty(cls) -> "Candidates":
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class Drafter(ABC):
    kind: str = "abstract"
    max_depth: int | None = None  # Medusa: number of heads; others unbounded

    @abstractmethod
    def reset(self, contexts: list[list[int]], capacity: int) -> None:
        """Start a batch. contexts[b] holds every token so far; its last token is the tree root."""

    @abstractmethod
    def accept(self, b: int, new_tokens: list[int], target_hidden: np.ndarray) -> None:
        """After verification: sequence b grew by `new_tokens` (the last one is the next root);
        `target_hidden` is the target's last hidden state at the node that produced it."""

    @abstractmethod
    def expand(self, trees: list[Tree], frontiers: list[list[int]]) -> list[list[Candidates]]:
        """For each sequence b and node n in frontiers[b], candidates for n's children."""

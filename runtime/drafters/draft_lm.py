"""Draft-LM drafter (SpecInfer): a small LM with the target's tokenizer expands the tree level by
level, one batched forward per level.

The draft keeps its own fixed-capacity KV cache of accepted tokens. At the root level it first
feeds the tokens accepted since its last step (ending with the new root) and commits them; deeper
levels feed every drafted node with the tree's ancestor mask against that cache, uncommitted.
"""
from __future__ import annotations

import numpy as np

from treespec.runtime.backends.base import StepInputs, TreeBackend
from treespec.runtime.drafters.base import Candidates, Drafter, Features
from treespec.runtime.trees.tree import Tree, batch_tree_inputs, chain_tree


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


class DraftModelDrafter(Drafter):
    kind = "draft"

    def __init__(self, backend: TreeBackend, top_k: int = 8):
        self.backend = backend
        self.top_k = top_k
        self.pending: list[list[int]] = []

    def reset(self, contexts: list[list[int]], capacity: int) -> None:
        self.backend.reset(len(contexts), capacity)
        self.pending = [list(c) for c in contexts]

    def accept(self, b: int, new_tokens: list[int], features: Features) -> None:
        self.pending[b] += new_tokens

    def expand(self, trees: list[Tree], frontiers: list[list[int]]) -> list[list[Candidates]]:
        if all(f == [0] for f in frontiers if f):
            out, last = self._feed_pending()
            refs = [[(b, last[b])] if frontiers[b] else [] for b in range(len(trees))]
        else:
            out, refs = self._feed_tree(trees, frontiers)
        flat = [r for per_seq in refs for r in per_seq]
        if not self.return_distributions and flat:
            # The backend ranks where its logits lie: on a device, no [T, V] logits cross to the host.
            ids, logprobs = self.backend.topk_logprobs(out, flat, self.top_k)
            it = iter(range(len(flat)))
            return [[Candidates(ids[i], logprobs[i]) for i in (next(it) for _ in per_seq)] for per_seq in refs]
        return [[self._candidates(out.logits[b, i]) for b, i in per_seq] for per_seq in refs]

    def _feed_pending(self):
        """Commit the pending chains; return the step and each chain's last row (the root)."""
        chains = [chain_tree(p) if p else chain_tree([0]) for p in self.pending]
        ids, pos, mask = batch_tree_inputs(chains, self.backend.lengths)
        out = self.backend.step(StepInputs(ids, pos, mask))
        self.backend.commit(out, [list(range(len(p))) for p in self.pending])
        last = [max(len(p), 1) - 1 for p in self.pending]
        self.pending = [[] for _ in self.pending]
        return out, last

    def _feed_tree(self, trees: list[Tree], frontiers: list[list[int]]):
        """Run all drafted (non-root) nodes; the root already sits in the draft cache."""
        width = max(max(len(t) - 1 for t in trees), 1)
        batch = len(trees)
        ids = np.zeros((batch, width), np.int64)
        pos = np.zeros((batch, width), np.int64)
        mask = np.zeros((batch, width, width), np.bool_)
        mask[:, np.arange(width), np.arange(width)] = True
        lengths = self.backend.lengths
        for b, tree in enumerate(trees):
            n = len(tree) - 1
            if n == 0:
                continue
            ids[b, :n] = tree.tokens[1:]
            pos[b, :n] = lengths[b] - 1 + np.asarray(tree.depths[1:])
            mask[b, :n, :n] = tree.ancestor_mask()[1:, 1:]
        out = self.backend.step(StepInputs(ids, pos, mask))
        return out, [[(b, node - 1) for node in frontier] for b, frontier in enumerate(frontiers)]

    def _candidates(self, logits: np.ndarray) -> Candidates:
        top = np.argpartition(-logits, self.top_k)[: self.top_k]
        top = top[np.argsort(-logits[top], kind="stable")]
        z = logits.astype(np.float64)
        logz = z.max() + np.log(np.exp(z - z.max()).sum())
        dist = _softmax(logits) if self.return_distributions else None
        return Candidates(top.astype(np.int64), z[top] - logz, dist)

"""N-gram lookup drafter (prompt lookup decoding, as a tree).

Candidates for a node are the tokens that followed the longest suffix of (context + the node's
path) found earlier in the context, weighted by how often each followed it. Several matches give
several branches, merged by shared prefixes because they are children of the same node.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from treespec.runtime.drafters.base import Candidates, Drafter, Features
from treespec.runtime.trees.tree import Tree


class NgramIndex:
    """next-token counts for every n-gram (n = 1..max_n) of a growing token list."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.tokens: list[int] = []
        self.table: dict[tuple[int, ...], Counter] = defaultdict(Counter)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the new token follows position end - 1
            for n in range(1, self.max_n + 1):
                if end - n < 0:
                    break
                self.table[tuple(self.tokens[end - n:end])][token] += 1
            self.tokens.append(token)

    def continuations(self, suffix: list[int], min_n: int) -> tuple[Counter, int]:
        for n in range(min(self.max_n, len(suffix)), min_n - 1, -1):
            found = self.table.get(tuple(suffix[-n:]))
            if found:
                return found, n
        return Counter(), 0


class LookupDrafter(Drafter):
    kind = "lookup"
    resets_slots = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, top_k: int = 4):
        self.max_ngram, self.min_ngram, self.top_k = max_ngram, min_ngram, top_k
        self.indexes: list[NgramIndex] = []

    def reset(self, contexts: list[list[int]], capacity: int) -> None:
        self.indexes = []
        for context in contexts:
            index = NgramIndex(self.max_ngram)
            index.extend(context)
            self.indexes.append(index)

    def reset_slot(self, b: int, context: list[int]) -> None:
        index = NgramIndex(self.max_ngram)
        index.extend(context)
        self.indexes[b] = index

    def accept(self, b: int, new_tokens: list[int], features: Features) -> None:
        self.indexes[b].extend(new_tokens)

    def expand(self, trees: list[Tree], frontiers: list[list[int]]) -> list[list[Candidates]]:
        out = []
        for index, tree, frontier in zip(self.indexes, trees, frontiers):
            per_node = []
            for node in frontier:
                path = [tree.tokens[n] for n in tree.path_to(node)[1:]]
                suffix = index.tokens[-self.max_ngram:] + path
                counts, n = index.continuations(suffix, self.min_ngram)
                if not counts:
                    per_node.append(Candidates.empty())
                    continue
                total = sum(counts.values())
                best = counts.most_common(self.top_k)
                # A longer matched n-gram is stronger evidence: shrink confidence for short ones.
                confidence = n / self.max_ngram
                probs = np.array([c / total * confidence for _, c in best])
                per_node.append(Candidates(np.array([t for t, _ in best], dtype=np.int64), np.log(probs)))
            out.append(per_node)
        return out

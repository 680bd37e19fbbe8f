"""Lossless verification of a drafted tree against the target's logits.

Greedy: walk from the root, following the child whose token equals the target's argmax at its
parent; the argmax at the last accepted node is the bonus token.

Sampling (SpecInfer's multi-draft speculative sampling): at node n with target distribution p,
try the children in order. A child c drawn from a drafter distribution q is accepted with
probability min(1, p(c)/q(c)); on rejection p <- norm(max(p - q, 0)). Children chosen
deterministically (top-k, lookup) use q = one-hot(c), which makes the rule "accept with p(c),
else remove c from p": sampling without replacement, lossless for any choice of candidates.
If every child is rejected the next token is drawn from what is left of p.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from treespec.runtime.tree import Tree


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Verdict:
    path: list[int]  # accepted node indices, root first
    tokens: list[int]  # new tokens: the accepted drafted tokens, then the bonus token


def target_distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution plain sampling draws from: temperature, then top-k, then top-p."""
    z = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < z.shape[-1]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


def verify_greedy(tree: Tree, logits: np.ndarray) -> Verdict:
    """logits: [T, V] for the tree's nodes."""
    argmax = logits[: len(tree)].argmax(axis=-1)
    node, path, tokens = 0, [0], []
    while True:
        want = int(argmax[node])
        child = tree.child_with_token(node, want)
        tokens.append(want)
        if child is None:
            return Verdict(path=path, tokens=tokens)
        node = child
        path.append(node)


def verify_sampling(tree: Tree, logits: np.ndarray, params: SamplingParams,
                    rng: np.random.Generator, proposals: dict[int, np.ndarray] | None = None) -> Verdict:
    """`proposals[n]` is the distribution q the children of node n were sampled from, if they were
    sampled; absent means they were chosen deterministically."""
    proposals = proposals or {}
    node, path, tokens = 0, [0], []
    while True:
        p = target_distribution(logits[node], params)
        q = proposals.get(node)
        accepted = None
        for child in tree.children[node]:
            token = tree.tokens[child]
            if q is None:
                if rng.random() < p[token]:
                    accepted = child
                    break
                p[token] = 0.0
            else:
                if q[token] > 0 and rng.random() < min(1.0, p[token] / q[token]):
                    accepted = child
                    break
                p = np.maximum(p - q, 0.0)
            total = p.sum()
            if total <= 0:
                break
            p /= total
        if accepted is None:
            tokens.append(int(rng.choice(p.shape[0], p=p)) if p.sum() > 0 else int(logits[node].argmax()))
            return Verdict(path=path, tokens=tokens)
        tokens.append(tree.tokens[accepted])
        node = accepted
        path.append(node)

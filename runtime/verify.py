"""Verification of a drafted tree against the target's logits.

Greedy (lossless): walk from the root, following the child whose token equals the target's argmax
at its parent; the argmax at the last accepted node is the bonus token.

Sampling, `acceptance="exact"` (lossless; SpecInfer's multi-draft speculative sampling): at node
n with target distribution p (temperature, top-k, top-p applied), try the children in order.
  * children drawn i.i.d. from a drafter distribution q (`proposals[n] = q`): accept child c with
    probability min(1, p(c)/q(c)); on rejection p <- norm(max(p - q, 0));
  * children chosen deterministically (top-k, lookup, a choice list): q = one-hot(c), so the rule
    is "accept with probability p(c), else p <- norm(p with c removed)": sampling without
    replacement, lossless for any choice of distinct candidates.
If every child is rejected the next token is drawn from what is left of p (the bonus token is
drawn from p at the last accepted node the same way). Every emitted token is then distributed
exactly as plain sampling from the target.

Sampling, `acceptance="typical"` (Medusa's typical acceptance; LOSSY): a drafted child c of an
accepted node is accepted when p(c) > min(posterior_threshold, posterior_alpha * exp(-H(p))); the
deepest accepted node wins (ties: the likelier path under the target) and the bonus token is
sampled from p there. Faster on high-entropy text, but the output no longer follows the target's
distribution: it is never the default and its stats say `lossless: false`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from treespec.errors import InputError
from treespec.runtime.backends.base import StepOutputs
from treespec.runtime.trees.tree import Tree

ACCEPTANCE_MODES = ("exact", "typical")
ACCEPTANCE_HELP = ("exact: lossless speculative sampling (SpecInfer), the default; "
                   "typical: Medusa's typical acceptance, LOSSY: the output no longer follows the "
                   "target's distribution (only differs from exact when temperature > 0)")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    acceptance: str = "exact"  # "exact" (lossless) or "typical" (Medusa, LOSSY)
    posterior_threshold: float = 0.09  # typical acceptance: Medusa's defaults
    posterior_alpha: float = 0.3

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def lossless(self) -> bool:
        return self.greedy or self.acceptance == "exact"

    @property
    def label(self) -> str:
        if self.acceptance == "typical" and not self.greedy:
            return (f"typical (LOSSY; threshold {self.posterior_threshold}, alpha {self.posterior_alpha})")
        return "exact (lossless)"

    def with_acceptance(self, acceptance: str = "exact", posterior_threshold: float = 0.09,
                        posterior_alpha: float = 0.3) -> "SamplingParams":
        """Validated copy with an acceptance rule; problems are InputErrors naming the field."""
        if acceptance not in ACCEPTANCE_MODES:
            raise InputError(f"acceptance must be one of {', '.join(ACCEPTANCE_MODES)}, got {acceptance!r}")
        for name, value in (("posterior_threshold", posterior_threshold), ("posterior_alpha", posterior_alpha)):
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not 0.0 <= value <= 1.0):
                raise InputError(f"{name} must be a number in [0, 1], got {value!r}")
        return replace(self, acceptance=acceptance, posterior_threshold=float(posterior_threshold),
                       posterior_alpha=float(posterior_alpha))


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


def sample_from(p: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from p (not necessarily normalised; must have positive mass)."""
    cdf = np.cumsum(p)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    i = min(i, p.shape[0] - 1)
    while p[i] <= 0 and i > 0:  # rounding at the top end: step back to a token with mass
        i -= 1
    return i


def verify_tree(tree: Tree, out: StepOutputs, b: int, sampling: SamplingParams, rng: np.random.Generator,
                proposals: dict[int, np.ndarray] | None = None) -> Verdict:
    """Sequence b's tree against the target step `out`, by the rule `sampling` asks for: greedy on
    the backend's argmax when it gave one (no [T, V] copy), greedy on the logits, typical (LOSSY)
    or exact speculative sampling against the drafter's proposals."""
    if sampling.greedy and out.argmax is not None:
        return verify_greedy_ids(tree, out.argmax[b])
    logits = out.logits[b, : len(tree)]
    if sampling.greedy:
        return verify_greedy(tree, logits)
    if sampling.acceptance == "typical":
        return verify_typical(tree, logits, sampling, rng)
    return verify_sampling(tree, logits, sampling, rng, proposals)


def verify_greedy(tree: Tree, logits: np.ndarray) -> Verdict:
    """logits: [T, V] for the tree's nodes."""
    return verify_greedy_ids(tree, logits[: len(tree)].argmax(axis=-1))


def verify_greedy_ids(tree: Tree, argmax: np.ndarray) -> Verdict:
    """verify_greedy from the target's argmax per node (e.g. computed on the backend's device)."""
    node, path, tokens = 0, [0], []
    while True:
        want = int(argmax[node])
        child = tree.child_with_token(node, want)
        tokens.append(want)
        if child is None:
            return Verdict(path=path, tokens=tokens)
        node = child
        path.append(node)


def accept_child(tree: Tree, node: int, p: np.ndarray, q: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[int | None, np.ndarray]:
    """Multi-draft speculative sampling at one node: (accepted child or None, the residual p)."""
    for child in tree.children[node]:
        token = tree.tokens[child]
        if q is None:  # deterministic child: q = one-hot(token)
            if rng.random() < p[token]:
                return child, p
            residual = p.copy()
            residual[token] = 0.0
        else:  # child drawn from q: accept with min(1, p/q)
            qt = q[token]
            if qt > 0 and rng.random() * qt < p[token]:
                return child, p
            residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        if total > 0:  # total == 0 means p <= q everywhere, i.e. p == q: rejection had probability 0
            p = residual / total
    return None, p


def verify_sampling(tree: Tree, logits: np.ndarray, params: SamplingParams,
                    rng: np.random.Generator, proposals: dict[int, np.ndarray] | None = None) -> Verdict:
    """`proposals[n]` is the distribution q the children of node n were drawn from (i.i.d.), if
    they were drawn; absent means they were chosen deterministically."""
    proposals = proposals or {}
    node, path, tokens = 0, [0], []
    while True:
        p = target_distribution(logits[node], params)
        accepted, p = accept_child(tree, node, p, proposals.get(node), rng)
        if accepted is None:
            tokens.append(sample_from(p, rng))
            return Verdict(path=path, tokens=tokens)
        tokens.append(tree.tokens[accepted])
        node = accepted
        path.append(node)


def verify_typical(tree: Tree, logits: np.ndarray, params: SamplingParams,
                   rng: np.random.Generator) -> Verdict:
    """Medusa's typical acceptance (LOSSY), see the module docstring. Greedy at temperature 0."""
    if params.greedy:
        return verify_greedy(tree, logits)
    dists: dict[int, np.ndarray] = {}
    score = {0: 0.0}  # log-probability of the accepted path under the target
    best = 0
    stack = [0]
    while stack:
        node = stack.pop()
        p = dists[node] = target_distribution(logits[node], params)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = float(-np.sum(np.where(p > 0, p * np.log(p), 0.0)))
        threshold = min(params.posterior_threshold, params.posterior_alpha * math.exp(-entropy))
        for child in tree.children[node]:
            pc = p[tree.tokens[child]]
            if pc > threshold:
                score[child] = score[node] + math.log(pc)
                stack.append(child)
                if (tree.depths[child], score[child]) > (tree.depths[best], score[best]):
                    best = child
    path = tree.path_to(best)
    tokens = [tree.tokens[n] for n in path[1:]] + [sample_from(dists[best], rng)]
    return Verdict(path=path, tokens=tokens)

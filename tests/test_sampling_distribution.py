"""Lossless sampling: speculative sampling over trees is distribution-preserving.

The target is REAL: a random-weight Llama with a vocabulary of 8 tokens, exported through
treespec_pkg/models/tree_model.py + exporter/onnx_export.py and run by ONNX Runtime (our backend). One
tree step over the full 8-ary tree of depth 3 under the prompt gives the target's exact logits for
every continuation of up to 3 tokens (585 prefixes, tree attention); plain sampling's exact
distribution of the first 3 tokens is enumerated from them (512 outcomes).

The drafter is a test double of a drafter's output: a fixed random distribution per path (its
top-k as candidates, and the full q for sampled children). Each run speculates until 3 tokens are
produced (trees are cut to the depth whose logits we hold), through the real policies
(runtime/trees/policies.py) and the real verifier (runtime/verify.py), 20k seeded runs per case. The
first 3 tokens' joint histogram must match the exact target distribution (chi-square, p > 0.01)
for several tree policies, top-k and sampled children, temperature 1 and 0.7 + top-k; the same
harness with deliberately broken acceptance rules must give p < 0.01.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from support.vocab8 import VOCAB, vocab8_backend, vocab8_model
from treespec.runtime.drafters.base import Candidates, Drafter
from treespec.runtime.trees.policies import draft_trees, parse_tree_config
from treespec.runtime.trees.tree import Tree
from treespec.runtime.verify import SamplingParams, Verdict, sample_from, target_distribution, verify_sampling

PROMPT = [1, 5, 3, 6]
GENERATED = 3
RUNS = 20_000


# -- the real target -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_target(tmp_path_factory):
    """(ONNX Runtime backend) of the random 8-token Llama (tests/support/vocab8.py)."""
    backend = vocab8_backend(vocab8_model(), tmp_path_factory.mktemp("vocab8"))
    yield backend
    backend.close()


def sampled_run(gen, cfg, params, batch: int, seed: int) -> list[tuple[int, ...]]:
    """One seeded batched generation from PROMPT: each sequence's GENERATED tokens."""
    out: list[list[int]] = [[] for _ in range(batch)]
    for event in gen.run([list(PROMPT)] * batch, GENERATED, cfg, params, seed=seed):
        for b, new in enumerate(event.new_tokens):
            out[b] += new
    return [tuple(o) for o in out]


def full_tree(root: int, depth: int) -> tuple[Tree, list[tuple[int, ...]]]:
    """Every continuation of up to `depth` tokens as one tree; node i continues by prefixes[i]."""
    tree, prefixes = Tree.root_only(root), [()]
    frontier = [0]
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for token in range(VOCAB):
                nxt.append(tree.add(node, token))
                prefixes.append(prefixes[node] + (token,))
        frontier = nxt
    return tree, prefixes


@pytest.fixture(scope="module")
def target_logits(small_target) -> dict[tuple[int, ...], np.ndarray]:
    """Exact next-token logits after PROMPT + s for every s of up to 3 tokens (one tree step)."""
    from treespec.runtime.backends.base import StepInputs
    from treespec.runtime.trees.tree import batch_tree_inputs, chain_tree

    backend = small_target
    backend.reset(1, 64)
    ids, pos, mask = batch_tree_inputs([chain_tree(PROMPT[:-1])], backend.lengths)
    backend.commit(backend.step(StepInputs(ids, pos, mask)), [list(range(len(PROMPT) - 1))])
    tree, prefixes = full_tree(PROMPT[-1], GENERATED)
    ids, pos, mask = batch_tree_inputs([tree], backend.lengths)
    logits = backend.step(StepInputs(ids, pos, mask)).logits[0].astype(np.float64)
    return {s: logits[i] for i, s in enumerate(prefixes)}


def exact_distribution(logits: dict, params: SamplingParams) -> dict[tuple[int, ...], float]:
    dist = {s: target_distribution(l, params) for s, l in logits.items() if len(s) < GENERATED}
    return {seq: float(np.prod([dist[seq[:i]][seq[i]] for i in range(GENERATED)]))
            for seq in itertools.product(range(VOCAB), repeat=GENERATED)}


def chi_square_p(counts: Counter, probs: dict[tuple, float], runs: int) -> float:
    """Pearson chi-square p-value; outcomes expected < 5 times are pooled into one bin."""
    import torch

    observed, expected, pooled_o, pooled_e = [], [], 0.0, 0.0
    for seq, p in probs.items():
        e = p * runs
        if e < 5:
            pooled_o += counts.get(seq, 0)
            pooled_e += e
        else:
            observed.append(counts.get(seq, 0))
            expected.append(e)
    if pooled_e > 0:
        observed.append(pooled_o)
        expected.append(pooled_e)
    o, e = np.asarray(observed, float), np.asarray(expected, float)
    stat = float(((o - e) ** 2 / e).sum())
    dof = len(o) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# -- the drafter double ----------------------------------------------------------------------------

class FixedRandomDrafter(Drafter):
    """q(. | context + path) is a fixed random distribution per path; candidates are its top-k."""

    kind = "fixed-random"

    def __init__(self, seed: int = 11, top_k: int = 3):
        self.seed, self.top_k = seed, top_k
        self.generated: tuple[int, ...] = ()
        self.return_distributions = True
        self._memo: dict[tuple, Candidates] = {}

    def reset(self, contexts, capacity):
        self.generated = ()

    def accept(self, b, new_tokens, target_hidden):
        self.generated += tuple(new_tokens)

    def candidates(self, path: tuple[int, ...]) -> Candidates:
        if path not in self._memo:
            rng = np.random.default_rng([self.seed, len(path), *path])
            q = rng.dirichlet(np.full(VOCAB, 0.6))
            top = np.argsort(-q, kind="stable")[: self.top_k]
            self._memo[path] = Candidates(top.astype(np.int64), np.log(q[top]), q)
        return self._memo[path]

    def expand(self, trees, frontiers):
        return [[self.candidates(self.generated + tuple(tree.tokens[n] for n in tree.path_to(node)[1:]))
                 for node in frontier] for tree, frontier in zip(trees, frontiers)]


# -- broken acceptance rules (each must be caught) ----------------------------------------------------

def broken_no_residual(tree, logits, params, rng, proposals=None) -> Verdict:
    """Accept child c with p(c) (or min(1, p/q)), but never move to the residual on rejection."""
    proposals = proposals or {}
    node, path, tokens = 0, [0], []
    while True:
        p = target_distribution(logits[node], params)
        q = proposals.get(node)
        accepted = None
        for child in tree.children[node]:
            t = tree.tokens[child]
            if rng.random() < (p[t] if q is None else min(1.0, p[t] / q[t])):
                accepted = child
                break
        if accepted is None:
            tokens.append(sample_from(p, rng))
            return Verdict(path, tokens)
        tokens.append(tree.tokens[accepted])
        node = accepted
        path.append(node)


def broken_top_child(tree, logits, params, rng, proposals=None) -> Verdict:
    """The seed tutorial's mistake: always follow the drafter's favourite child."""
    node, path, tokens = 0, [0], []
    while tree.children[node]:
        node = tree.children[node][0]
        path.append(node)
        tokens.append(tree.tokens[node])
    tokens.append(sample_from(target_distribution(logits[node], params), rng))
    return Verdict(path, tokens)


# -- the harness ----------------------------------------------------------------------------------

def speculative_histogram(logits, cfg_raw: dict, params: SamplingParams, verify, runs: int = RUNS,
                          seed: int = 0) -> tuple[Counter, float]:
    """First-3-token histogram of `runs` speculative decodes; also the mean tokens per step."""
    cfg = parse_tree_config(cfg_raw)
    sample = cfg.sample_children
    drafter = FixedRandomDrafter()
    rng = np.random.default_rng(seed)
    fixed: dict[tuple, tuple] = {}  # top-k trees are a function of the context: build once

    def draft(generated: tuple[int, ...]):
        depth_cfg = replace(cfg, max_depth=min(cfg.max_depth, GENERATED - len(generated)))
        drafter.generated = generated
        root = (PROMPT + list(generated))[-1]
        drafted = draft_trees(depth_cfg, drafter, [root], rng=rng if sample else None,
                              temperature=params.temperature)
        tree = drafted.trees[0]
        node_logits = np.stack([logits[generated + tuple(tree.tokens[n] for n in tree.path_to(i)[1:])]
                                for i in range(len(tree))])
        return tree, node_logits, drafted.proposals[0]

    counts: Counter = Counter()
    steps = produced = 0
    for _ in range(runs):
        generated: tuple[int, ...] = ()
        while len(generated) < GENERATED:
            if sample:
                tree, node_logits, proposals = draft(generated)
            else:
                if generated not in fixed:
                    fixed[generated] = draft(generated)
                tree, node_logits, proposals = fixed[generated]
            verdict = verify(tree, node_logits, params, rng, proposals)
            steps += 1
            produced += len(verdict.tokens)
            generated += tuple(verdict.tokens)
        counts[generated[:GENERATED]] += 1
    return counts, produced / steps


T1 = SamplingParams(temperature=1.0)
T07 = SamplingParams(temperature=0.7, top_k=6)
WIDTHS = {"policy": "widths", "widths": [3, 2, 2]}
OPT = {"policy": "opt", "budget": 6, "delta": 0.0}
BRANCHING_SAMPLED = {"policy": "depth_branching", "depth": 3, "branching": 2, "sample_children": True}
ADAPTIVE_SAMPLED = {"policy": "adaptive", "budget": 8, "max_width": 3, "confident": 0.6, "unsure": 0.2,
                    "min_path_prob": 0.0, "sample_children": True}


def test_target_is_not_degenerate(target_logits):
    """The check has power only if the target is neither one-hot nor uniform."""
    exact = exact_distribution(target_logits, T1)
    assert abs(sum(exact.values()) - 1) < 1e-9
    top = max(exact.values())
    assert 0.01 < top < 0.5 and sum(p > 1e-3 for p in exact.values()) > 60


@pytest.mark.parametrize("cfg,params,runs", [
    (WIDTHS, T1, RUNS),  # top-k children, q = one-hot
    (OPT, T07, RUNS),  # OPT-Tree, temperature + top-k on the target
    (BRANCHING_SAMPLED, T1, RUNS),  # children drawn from q: min(1, p/q), residual norm(max(p - q, 0))
    (ADAPTIVE_SAMPLED, T07, RUNS // 2),  # (Python-bound: half the runs keep CI time down)
], ids=["widths-topk-T1", "opt-topk-T0.7k6", "branching-sampled-T1", "adaptive-sampled-T0.7k6"])
def test_speculative_sampling_matches_the_target(target_logits, cfg, params, runs):
    counts, per_step = speculative_histogram(target_logits, cfg, params, verify_sampling, runs=runs)
    p = chi_square_p(counts, exact_distribution(target_logits, params), runs)
    assert p > 0.01, (cfg, p)
    assert per_step > 1.15, "the drafts must actually be accepted sometimes for the test to mean anything"


@pytest.mark.parametrize("cfg,rule,runs", [
    (WIDTHS, broken_no_residual, RUNS),
    (WIDTHS, broken_top_child, RUNS),
    (BRANCHING_SAMPLED, broken_no_residual, RUNS // 4),  # caught with p < 1e-5 already at 4k runs
], ids=["topk-no-residual", "topk-always-top-child", "sampled-no-residual"])
def test_broken_acceptance_rules_are_caught(target_logits, cfg, rule, runs):
    counts, _ = speculative_histogram(target_logits, cfg, T1, rule, runs=runs)
    p = chi_square_p(counts, exact_distribution(target_logits, T1), runs)
    assert p < 0.01, (rule.__name__, p)


def test_plain_sampling_matches_the_target(target_logits):
    """The harness itself: tree none (root-only trees) is plain sampling."""
    counts, per_step = speculative_histogram(target_logits, {"policy": "none"}, T1, verify_sampling, runs=5000,
                                             seed=1)
    assert per_step == 1.0
    assert chi_square_p(counts, exact_distribution(target_logits, T1), 5000) > 0.01


def test_typical_acceptance_is_lossy(target_logits):
    """Medusa's typical acceptance is labelled LOSSY for a reason: the same harness detects it."""
    from treespec.runtime.verify import verify_typical

    params = SamplingParams(temperature=1.0).with_acceptance("typical", 0.09, 0.3)
    assert not params.lossless and "LOSSY" in params.label
    counts, per_step = speculative_histogram(
        target_logits, WIDTHS, params, lambda t, lg, pr, rng, _q: verify_typical(t, lg, pr, rng), runs=5000)
    assert chi_square_p(counts, exact_distribution(target_logits, params), 5000) < 0.01


# -- the generator's wiring (real backend, batch, sampled children, proposals) ------------------------

class BatchFixedRandomDrafter(FixedRandomDrafter):
    """The same fixed q per path, for a batch driven by TreeGenerator."""

    def reset(self, contexts, capacity):
        self.ctx = [list(c) for c in contexts]

    def accept(self, b, new_tokens, target_hidden):
        self.ctx[b] += list(new_tokens)

    def expand(self, trees, frontiers):
        return [[self.candidates(tuple(self.ctx[b][len(PROMPT):]) + tuple(tree.tokens[n] for n in tree.path_to(node)[1:]))
                 for node in frontier] for b, (tree, frontier) in enumerate(zip(trees, frontiers))]


def test_generator_sampled_children_preserve_the_distribution(small_target, target_logits, monkeypatch):
    """TreeGenerator end to end on the real backend: sampled children, the proposals it hands to
    the verifier are the tempered q the children were drawn from, and the first 3 tokens of a
    batch of 8 identical prompts x 500 seeded runs follow the target."""
    import treespec.runtime.generator as generator_module
    import treespec.runtime.verify as verify_module
    from treespec.runtime.generator import TreeGenerator
    from treespec.runtime.trees.policies import proposal_distribution

    drafter = BatchFixedRandomDrafter()
    checked = []

    def spy(tree, logits, params, rng, proposals=None):
        for node, q in (proposals or {}).items():
            b = next(i for i, t in enumerate(trees_seen[-1]) if t is tree)
            path = tuple(drafter.ctx[b][len(PROMPT):]) + tuple(tree.tokens[n] for n in tree.path_to(node)[1:])
            assert np.allclose(q, proposal_distribution(drafter.candidates(path).distribution, params.temperature))
            assert all(q[tree.tokens[c]] > 0 for c in tree.children[node])
            checked.append(node)
        return verify_sampling(tree, logits, params, rng, proposals)

    trees_seen: list = []
    real_draft = generator_module.draft_trees

    def draft_spy(*args, **kwargs):
        out = real_draft(*args, **kwargs)
        trees_seen.append(out.trees)
        return out

    monkeypatch.setattr(verify_module, "verify_sampling", spy)  # verify_tree's sampling rule
    monkeypatch.setattr(generator_module, "draft_trees", draft_spy)
    gen = TreeGenerator(small_target, drafter, eos_token_ids=[], max_context=64)
    cfg = parse_tree_config({"policy": "depth_branching", "depth": 2, "branching": 2, "sample_children": True})
    counts: Counter = Counter()
    batch, runs = 8, 500
    for seed in range(runs):
        counts.update(sampled_run(gen, cfg, T07, batch, seed))
    stats = gen.stats.as_dict()
    assert stats["sampled_children"] and stats["lossless"] and checked
    assert chi_square_p(counts, exact_distribution(target_logits, T07), batch * runs) > 0.01

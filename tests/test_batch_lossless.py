"""Greedy lossless for every tree policy x every drafter in the tiny artifacts, batched.

Real exported tiny Llama on ONNX Runtime. Every prompt is first decoded alone with `--tree none`;
every speculative run (batch of prompts of different lengths, each with its own ragged tree and
KV length) must give token-for-token the same output. The drafters are the ones the tiny
artifacts' manifest lists (lookup, medusa, draft when exported): untrained drafters are mostly
rejected, which exercises the rejection paths; the lookup drafter on repetitive prompts gets long
accepted runs, which exercises the acceptance paths and the KV commit of several rows.
"""
from __future__ import annotations

import numpy as np
import pytest

from support.tree_checks import POLICY_TREES
from treespec.runtime.api import SpeculativeGenerator
from treespec.artifacts import load_manifest

NEW_TOKENS = 20
# Every policy, and a sampled-children preset run greedily.
POLICY_TREES = {**POLICY_TREES, "opt-sampled": "opt-sampled"}


def repetitive(seed: int, length: int) -> list[int]:
    """Token prompts with repeats, so that the lookup drafter finds n-grams."""
    rng = np.random.default_rng(seed)
    motif = [int(t) for t in rng.integers(3, 3000, int(rng.integers(3, 7)))]
    return (motif * (length // len(motif) + 1))[:length]


@pytest.fixture(scope="module")
def setup(tiny_artifacts, bench_prompts):
    """Generators per drafter present in the manifest, prompts, and each prompt decoded alone."""
    drafters = list(load_manifest(tiny_artifacts).drafters)
    assert "lookup" in drafters
    gens = {d: SpeculativeGenerator.from_artifacts(tiny_artifacts, drafter=d, threads=1) for d in drafters}
    base = gens["lookup"]
    prompts = [base.encode(p) for p in bench_prompts[:4]] + [repetitive(s, n) for s, n in
                                                              ((1, 9), (2, 30), (3, 17), (4, 52))]
    prompts = [prompts[i] for i in (4, 0, 5, 1, 6, 2, 7, 3)]  # lengths vary inside every batch
    assert len({len(p) for p in prompts}) >= 6
    alone = [base.generate(p, max_new_tokens=NEW_TOKENS, tree="none").token_ids for p in prompts]
    yield gens, prompts, alone
    for g in gens.values():
        g.close()


@pytest.mark.parametrize("policy", list(POLICY_TREES))
def test_every_policy_every_drafter_batch_of_3(setup, policy):
    gens, prompts, alone = setup
    tree = POLICY_TREES[policy]
    for name, gen in gens.items():
        got = [r.token_ids for r in gen.generate_batch(prompts[:3], max_new_tokens=NEW_TOKENS, tree=tree)]
        assert got == alone[:3], (name, policy)
        stats = gen.engine.stats.as_dict()
        assert stats["lossless"] and stats["tree_policy"] == gen.resolve_tree(tree).policy
        assert stats["mean_tree_size"] <= gen.resolve_tree(tree).max_nodes


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batch_sizes_equal_each_prompt_alone(setup, batch):
    gens, prompts, alone = setup
    trees = ["opt32", POLICY_TREES["adaptive"], POLICY_TREES["auto"]]
    for name, gen in gens.items():
        for tree in trees if name == "lookup" else trees[:1]:
            got = [r.token_ids for r in gen.generate_batch(prompts[:batch], max_new_tokens=NEW_TOKENS, tree=tree)]
            assert got == alone[:batch], (name, tree, batch)


def test_lookup_trees_are_accepted_on_repetitive_prompts(setup):
    """The acceptance path is exercised: several tokens per step on average, and ragged trees."""
    gens, prompts, alone = setup
    gen = gens["lookup"]
    reps = [prompts[i] for i in (0, 2, 4, 6)]
    want = [alone[i] for i in (0, 2, 4, 6)]
    for tree in ("opt32", POLICY_TREES["adaptive"], POLICY_TREES["auto"]):
        got = gen.generate_batch(reps, max_new_tokens=NEW_TOKENS, tree=tree)
        assert [r.token_ids for r in got] == want
        stats = got[0].stats
        # some steps commit several rows: at least one step produced 3+ tokens
        assert stats["mean_accepted"] > 1.15 and len(stats["accepted_histogram"]) > 3, (tree, stats)


def test_seeded_sampling_is_reproducible_and_labelled(setup):
    """--seed reproduces sampled runs (children drawn from the drafter's q included); stats say
    which acceptance rule ran and whether it is lossless."""
    gens, prompts, alone = setup
    for name, gen in gens.items():
        kwargs = dict(max_new_tokens=12, tree="specinfer-sampled", temperature=0.9, top_k=50, seed=5)
        first = [r.token_ids for r in gen.generate_batch(prompts[:2], **kwargs)]
        stats = gen.engine.stats.as_dict()
        assert [r.token_ids for r in gen.generate_batch(prompts[:2], **kwargs)] == first
        assert stats["lossless"] and stats["acceptance"] == "exact (lossless)"
        assert stats.get("sampled_children", False) == (name in ("medusa", "draft")), name
    gen = gens["lookup"]
    lossy = gen.generate(prompts[0], max_new_tokens=8, temperature=0.9, seed=1, acceptance="typical")
    assert lossy.stats["lossless"] is False and "LOSSY" in lossy.stats["acceptance"]
    greedy = gen.generate(prompts[0], max_new_tokens=NEW_TOKENS, acceptance="typical")  # temperature 0
    assert greedy.token_ids == alone[0] and greedy.stats["lossless"]


def test_cli_help_labels_typical_acceptance_lossy():
    from treespec.runtime.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["generate"]
    text = sub.format_help()
    assert "--acceptance" in text and "LOSSY" in text


def test_auto_latency_curve_is_measured_once_and_cached(setup, tiny_artifacts, tmp_path, monkeypatch):
    """`auto` measures the verify latency curve once per artifacts + backend + device (+threads,
    host), keeps it in the artifact directory, or in the user cache dir when that is unwritable."""
    import json
    import shutil

    import treespec.runtime.generator as generator_module
    from treespec.runtime.trees.auto import CURVE_FILE, LatencyCache

    gens, prompts, alone = setup
    gen = gens["lookup"]
    gen.generate(prompts[0], max_new_tokens=4, tree=POLICY_TREES["auto"])
    saved = json.loads((tiny_artifacts / CURVE_FILE).read_text())["curves"]
    key = next(k for k in saved if k.startswith("onnxruntime/cpu/threads=1/"))
    assert saved[key]["sizes"][0] == 1 and saved[key]["sizes"][-1] >= 17
    assert saved[key]["seconds"] == sorted(saved[key]["seconds"])

    def no_measuring(*args, **kwargs):
        raise AssertionError("the curve is cached: no new measurement")

    monkeypatch.setattr(generator_module, "measure_latency", no_measuring)
    gen.engine.latency = None  # forget the in-memory copy: the file must serve
    gen.generate(prompts[0], max_new_tokens=4, tree=POLICY_TREES["auto"])
    assert gen.engine.latency_cache.used_path == tiny_artifacts / CURVE_FILE

    # An artifact directory where the file cannot be written: the user cache dir is used.
    arts = tmp_path / "arts"
    arts.mkdir()
    shutil.copy(tiny_artifacts / "manifest.json", arts / "manifest.json")
    (arts / CURVE_FILE).mkdir()  # a directory where the file should be: not writable as a file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = LatencyCache(arts, "onnxruntime", "cpu", 1)
    curve = gen.engine.latency_curve(17)
    written = cache.put(curve)
    assert written is not None and written.is_relative_to(tmp_path / "cache")
    again = LatencyCache(arts, "onnxruntime", "cpu", 1).get(17)
    assert again is not None and again.seconds == curve.seconds
    assert LatencyCache(arts, "onnxruntime", "cuda", 1).get(17) is None  # other device: re-measure

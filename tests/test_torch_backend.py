"""The torch backend: lossless against its own --tree none, and the same logits as ONNX Runtime."""
from __future__ import annotations

import numpy as np
import pytest

PROMPTS = ["Write a haiku about trees.", "List three prime numbers."]


def _tokens(gen, tree):
    return [gen.generate(p, max_new_tokens=12, tree=tree).token_ids for p in PROMPTS]


@pytest.mark.parametrize("drafter", ["lookup", "medusa", "draft"])
def test_torch_lossless_cpu(tiny_artifacts, drafter):
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(tiny_artifacts, "torch", "cpu", drafter=drafter)
    assert _tokens(gen, None) == _tokens(gen, "none")


def test_torch_matches_onnxruntime(tiny_artifacts):
    from treespec.runtime.backends.base import StepInputs
    from treespec.runtime.loader import load_graph
    from treespec.artifacts import load_manifest
    from treespec.runtime.trees.tree import Tree, batch_tree_inputs, chain_tree

    manifest = load_manifest(tiny_artifacts)
    rng = np.random.default_rng(0)
    backends = [load_graph(manifest, "target", b, "cpu") for b in ("torch", "onnxruntime")]
    prompt = rng.integers(3, 1000, 20).tolist()
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 5]
    tree = Tree(tokens=rng.integers(3, 1000, len(parents)).tolist(), parents=parents)
    logits = []
    for be in backends:
        be.reset(1, 64)
        ids, pos, mask = batch_tree_inputs([chain_tree(prompt)], be.lengths)
        be.commit(be.step(StepInputs(ids, pos, mask)), [list(range(len(prompt)))])
        out = be.step(StepInputs(*batch_tree_inputs([tree], be.lengths)))
        be.commit(out, [[0, 1, 3]])
        out2 = be.step(StepInputs(*batch_tree_inputs([tree], be.lengths)))
        logits.append((np.asarray(out.logits), np.asarray(out2.logits)))
    for a, b in zip(*logits):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_torch_cuda_graphs_lossless(tiny_artifacts):
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(tiny_artifacts, "torch", "cuda", drafter="lookup")
    assert gen.target.use_graphs
    assert _tokens(gen, None) == _tokens(gen, "none")
    gen.target.reset(1, 4096)  # a larger buffer: graphs are re-captured into a fresh pool
    assert _tokens(gen, None) == _tokens(gen, "none")

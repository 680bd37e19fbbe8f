"""KV bookkeeping: after any sequence of accepted tree paths, the cache equals the cache built by
feeding the accepted tokens one at a time. The contract of every backend that runs on the CPU:
ONNX Runtime (host buffers), the ONNX Runtime device backend on the CPU provider, and torch."""
from __future__ import annotations

import numpy as np
import pytest

from treespec.runtime.backends.base import StepInputs
from treespec.runtime.loader import load_target
from treespec.artifacts import load_manifest
from treespec.runtime.trees.tree import Tree, batch_tree_inputs, chain_tree


def _step(backend, trees):
    ids, pos, mask = batch_tree_inputs(trees, backend.lengths)
    return backend.step(StepInputs(ids, pos, mask))


CPU_BACKENDS = ["onnxruntime", "onnxruntime-device", "torch"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cache_after_random_accepted_paths_equals_token_by_token(tiny_artifacts, backend):
    manifest = load_manifest(tiny_artifacts)
    tree_backend = load_target(manifest, backend, "cpu")
    plain_backend = load_target(manifest, backend, "cpu")
    rng = np.random.default_rng(0)
    vocab = manifest.dims.vocab_size
    batch = 3
    tree_backend.reset(batch, 200)
    plain_backend.reset(batch, 200)
    prompts = [[int(t) for t in rng.integers(0, vocab, n)] for n in (5, 9, 2)]
    accepted_tokens: list[list[int]] = [list(p) for p in prompts]
    out = _step(tree_backend, [chain_tree(p) for p in prompts])
    tree_backend.commit(out, [list(range(len(p))) for p in prompts])

    for _ in range(6):
        trees, paths = [], []
        for b in range(batch):
            size = int(rng.integers(1, 20))
            tree = Tree(tokens=[int(t) for t in rng.integers(0, vocab, size)],
                        parents=[-1] + [int(rng.integers(0, i)) for i in range(1, size)])
            leaf = int(rng.integers(0, size))
            path = tree.path_to(leaf) if b != 1 or rng.random() < 0.5 else []  # sometimes nothing
            trees.append(tree)
            paths.append(path)
            accepted_tokens[b] += [tree.tokens[n] for n in path]
        out = _step(tree_backend, trees)
        tree_backend.commit(out, paths)

    # Reference: one token per step, each sequence on its own.
    longest = max(len(t) for t in accepted_tokens)
    for i in range(longest):
        trees = [chain_tree([t[i] if i < len(t) else 0]) for t in accepted_tokens]
        out = _step(plain_backend, trees)
        plain_backend.commit(out, [[0] if i < len(t) else [] for t in accepted_tokens])

    assert tree_backend.lengths.tolist() == [len(t) for t in accepted_tokens]
    assert plain_backend.lengths.tolist() == tree_backend.lengths.tolist()
    for (k1, v1), (k2, v2) in zip(tree_backend.read_cache(), plain_backend.read_cache()):
        for b, n in enumerate(tree_backend.lengths):
            np.testing.assert_allclose(k1[b, :, :n], k2[b, :, :n], atol=1e-5)
            np.testing.assert_allclose(v1[b, :, :n], v2[b, :, :n], atol=1e-5)

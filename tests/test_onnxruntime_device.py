"""The ONNX Runtime device-buffer backend (the CUDA path): same steps as the numpy backend, lossless
against its own --tree none. On the CPU it binds torch CPU tensors the way it binds CUDA tensors
on the GPU, so its padding, bucketing and device-side commit run in CI."""
from __future__ import annotations

import numpy as np
import pytest

from treespec.runtime.backends.base import StepInputs
from treespec.artifacts import load_manifest
from treespec.runtime.trees.tree import Tree, batch_tree_inputs, chain_tree

PROMPTS = ["Write a haiku about trees.", "List three prime numbers.", "Explain KV caching briefly."]


def _device_backend(manifest, name: str, device: str = "cpu", **kwargs):
    from treespec.runtime.backends.onnxruntime import open_session
    from treespec.runtime.backends.onnxruntime_device import OnnxRuntimeDeviceBackend

    dims = manifest.graph_dims(name)
    session = open_session(manifest.require_file(manifest.graph(name).onnx), device, cuda_graphs=device == "cuda")
    return OnnxRuntimeDeviceBackend(session, dims.num_layers, dims.num_kv_heads, dims.head_dim, device,
                                    cuda_graphs=device == "cuda", **kwargs)


def _steps(backend, prompt, tree):
    backend.reset(1, 64)
    ids, pos, mask = batch_tree_inputs([chain_tree(prompt)], backend.lengths)
    backend.commit(backend.step(StepInputs(ids, pos, mask)), [list(range(len(prompt)))])
    first = backend.step(StepInputs(*batch_tree_inputs([tree], backend.lengths)))
    logits_first = np.array(first.logits)  # a copy: a backend may reuse its output buffers next step
    backend.commit(first, [[0, 1, 3]])
    second = backend.step(StepInputs(*batch_tree_inputs([tree], backend.lengths)))
    return logits_first, np.asarray(second.logits), np.asarray(second.hidden_states), backend.read_cache()


@pytest.mark.parametrize("min_bucket", [1, 16])
def test_device_backend_matches_numpy_backend(tiny_artifacts, min_bucket):
    from treespec.runtime.loader import load_graph

    manifest = load_manifest(tiny_artifacts)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 1000, 20).tolist()
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 5]
    tree = Tree(tokens=rng.integers(3, 1000, len(parents)).tolist(), parents=parents)
    want = _steps(load_graph(manifest, "target", "onnxruntime", "cpu"), prompt, tree)
    got = _steps(_device_backend(manifest, "target", min_bucket=min_bucket), prompt, tree)
    for a, b in zip(want[:3], got[:3]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    for (ka, va), (kb, vb) in zip(want[3], got[3]):  # the valid rows: prompt + accepted path
        assert kb.shape == vb.shape == (1, kb.shape[1], 20 + 3, kb.shape[3])
        np.testing.assert_allclose(ka[:, :, :23], kb, atol=1e-5, rtol=0)
        np.testing.assert_allclose(va[:, :, :23], vb, atol=1e-5, rtol=0)


def test_the_minimum_step_counts_the_rows_of_the_whole_batch(tiny_artifacts):
    """min_bucket 16: one sequence's 1-token step is padded to 16 tokens, each of a batch of 4 to 4
    (16 rows in all), and a batch of 32 is not padded; the logits equal the unpadded backend's."""
    manifest = load_manifest(tiny_artifacts)
    padded, exact = (_device_backend(manifest, "target", min_bucket=m) for m in (16, 1))
    for batch, tokens in ((1, 16), (4, 4), (32, 1)):
        ids = np.arange(3, 3 + 5 * batch).reshape(batch, 5).tolist()
        outs = []
        for backend in (padded, exact):
            backend.reset(batch, 64)
            prefill = backend.step(StepInputs(*batch_tree_inputs([chain_tree(row) for row in ids], backend.lengths)))
            backend.commit(prefill, [list(range(5))] * batch)
            step = backend.step(StepInputs(*batch_tree_inputs([chain_tree([7])] * batch, backend.lengths)))
            outs.append(np.asarray(step.logits))
        assert (batch, tokens) in padded._buckets
        np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=0)


def _generator(tiny_artifacts, drafter: str, device: str = "cpu", min_bucket: int | None = 4):
    from treespec.runtime.api import SpeculativeGenerator
    from treespec.runtime.drafters.draft_lm import DraftModelDrafter
    from treespec.runtime.generator import TreeGenerator

    gen = SpeculativeGenerator.from_artifacts(tiny_artifacts, "onnxruntime", device, drafter=drafter)
    if device == "cpu":  # the API picks the numpy backend on the CPU: swap in the device backend
        manifest = gen.manifest
        gen.target = _device_backend(manifest, "target", device, min_bucket=min_bucket)
        if drafter == "draft":
            gen.drafter = DraftModelDrafter(_device_backend(manifest, "draft", device, min_bucket=1),
                                            gen.drafter.top_k)
        gen.engine = TreeGenerator(gen.target, gen.drafter, manifest.eos_token_ids, manifest.dims.max_context)
    return gen


def _tokens(gen, tree, prompts=PROMPTS):
    return [gen.generate(p, max_new_tokens=16, tree=tree).token_ids for p in prompts]


@pytest.mark.parametrize("drafter", ["lookup", "medusa", "draft"])
def test_device_backend_lossless_cpu(tiny_artifacts, drafter):
    from treespec.runtime.api import SpeculativeGenerator

    gen = _generator(tiny_artifacts, drafter)
    plain = _tokens(gen, "none")
    assert _tokens(gen, None) == plain
    assert _tokens(gen, {"policy": "opt", "budget": 12}) == plain
    numpy_plain = _tokens(SpeculativeGenerator.from_artifacts(tiny_artifacts, "onnxruntime", "cpu", drafter="none"), "none")
    assert plain == numpy_plain


@pytest.mark.gpu
@pytest.mark.parametrize("drafter", ["lookup", "medusa", "draft"])
def test_onnxruntime_cuda_lossless(tiny_artifacts, drafter):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (the CUDA provider) on this GPU machine")
    gen = _generator(tiny_artifacts, drafter, "cuda")
    assert gen.target.cuda_graphs, "CUDA graphs fell back to eager runs"
    plain = _tokens(gen, "none")
    assert _tokens(gen, None) == plain
    gen.target.reset(1, 4096)  # a larger buffer: new bindings, new graph ids
    assert _tokens(gen, None) == plain

"""`treespec-export --ort-fusions` (exporter/ort_fusions.py): ONNX Runtime's transformer optimiser on
the target and draft graphs, CPU, tiny random model. The fused graphs hold ONNX Runtime's RMSNorm
kernels (two per layer), keep the tree I/O (same logits as the unfused graph on a tree step with a
past), decode losslessly (speculative = plain with the same graphs), and cannot be combined with
TensorRT engines."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from treespec.errors import InputError
from treespec.exporter.pipeline import ExportOptions, run_export

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors."]


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "tiny"
    run_export(ExportOptions(model="tiny-random", out=out, max_context=256, drafters=["draft", "lookup"],
                             ort_fusions=True), progress=lambda m: None)
    return out


def test_the_graphs_hold_ort_rmsnorm_kernels(fused):
    from treespec.artifacts import load_manifest

    manifest = load_manifest(fused)
    layers = manifest.model.dims.num_layers
    for name in ("target", "draft"):
        ops = Counter(n.op_type for n in onnx.load(str(fused / f"{name}.onnx"), load_external_data=False).graph.node)
        recorded = manifest.export["ort_fusions"][name]
        assert ops["SkipSimplifiedLayerNormalization"] == recorded["SkipSimplifiedLayerNormalization"] > 0
        if name == "target":
            assert recorded["SkipSimplifiedLayerNormalization"] == 2 * layers


def test_a_tree_step_gives_the_unfused_graphs_outputs(fused, tiny_artifacts):
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(folder / "target.onnx"), providers=["CPUExecutionProvider"])
                for folder in (tiny_artifacts, fused)]
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sessions[0].get_inputs():
        shape = [2 if d == "batch" else 5 if d == "tree_tokens" else 16 if d == "past" else d for d in i.shape]
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 100, shape)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(8 + np.arange(5), (2, 1))
        elif i.name == "tree_mask":
            feeds[i.name] = np.tile(np.tril(np.ones((5, 5), bool)), (2, 1, 1))
        elif i.name == "past_lengths":
            feeds[i.name] = np.array([8, 3])
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    want, got = (s.run(None, feeds) for s in sessions)
    for name, a, b in zip([o.name for o in sessions[0].get_outputs()], want, got):
        np.testing.assert_allclose(b, a, atol=1e-4, err_msg=name)


def test_speculative_decoding_is_lossless_with_the_fused_graphs(fused):
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(fused, backend="onnxruntime", drafter="draft")
    try:
        for prompt in PROMPTS:
            plain = gen.generate(prompt, max_new_tokens=24, tree="none").token_ids
            assert gen.generate(prompt, max_new_tokens=24).token_ids == plain
    finally:
        gen.close()


@pytest.mark.parametrize("engines, attention", [("tensorrt-rtx", "decomposed"), ("none", "plugin")])
def test_fusions_are_refused_where_tensorrt_builds_the_graph(tmp_path, engines, attention):
    with pytest.raises(InputError, match="--ort-fusions"):
        run_export(ExportOptions(model="tiny-random", out=tmp_path / "x", engines=engines, attention=attention,
                                 ort_fusions=True), progress=lambda m: None)
    assert not (tmp_path / "x").exists()

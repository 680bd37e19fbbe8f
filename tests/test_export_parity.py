"""Exported tree graphs vs. the HF PyTorch model given the equivalent 4-D mask, on every backend
that runs on the CPU (ONNX Runtime, its device backend on the CPU provider, torch over the
artifacts' own weights)."""
from __future__ import annotations

import numpy as np
import pytest

from support.parity import backend_tree_logits, hf_tree_logits, random_tree
from treespec.artifacts import load_manifest
from treespec.runtime.loader import load_target

TOLERANCE = 1e-3
CPU_BACKENDS = ["onnxruntime", "onnxruntime-device", "torch"]


def check_parity(artifacts, checkpoint, cases: int, seed: int, backend_name: str = "onnxruntime") -> float:
    manifest = load_manifest(artifacts)
    backend = load_target(manifest, backend_name, "cpu")
    model = checkpoint.model
    model.config._attn_implementation = "eager"
    rng = np.random.default_rng(seed)
    worst = 0.0
    sizes = [1, 64] + [int(rng.integers(2, 65)) for _ in range(cases - 2)]
    for size in sizes:
        prefix = [int(t) for t in rng.integers(0, manifest.dims.vocab_size, int(rng.integers(1, 40)))]
        tree = random_tree(rng, size, manifest.dims.vocab_size)
        got = backend_tree_logits(backend, prefix, tree)
        want = hf_tree_logits(model, prefix, tree)
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"max |{backend_name} - PyTorch| over {cases} random trees: {worst:.2e}")
    return worst


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_decomposed_parity(tiny_artifacts, tiny_hf, backend):
    assert check_parity(tiny_artifacts, tiny_hf, cases=8, seed=0, backend_name=backend) < TOLERANCE


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_onnx_attention_parity(tiny_artifacts_onnx_attention, tiny_hf, backend):
    assert check_parity(tiny_artifacts_onnx_attention, tiny_hf, cases=8, seed=1, backend_name=backend) < TOLERANCE


@pytest.mark.slow
def test_smollm2_decomposed_parity(smollm2_artifacts, smollm2_hf):
    assert check_parity(smollm2_artifacts, smollm2_hf, cases=5, seed=2) < TOLERANCE


@pytest.mark.slow
def test_smollm2_onnx_attention_parity(smollm2_artifacts_onnx_attention, smollm2_hf):
    assert check_parity(smollm2_artifacts_onnx_attention, smollm2_hf, cases=5, seed=3) < TOLERANCE


def test_graph_io_contract(tiny_artifacts):
    import onnx

    manifest = load_manifest(tiny_artifacts)
    graph = onnx.load(str(tiny_artifacts / "target.onnx"), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    assert list(inputs)[:4] == ["input_ids", "position_ids", "tree_mask", "past_lengths"]
    assert inputs["tree_mask"].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    dims = [d.dim_param or d.dim_value for d in inputs["past_key_0"].type.tensor_type.shape.dim]
    assert dims == ["batch", manifest.dims.num_kv_heads, "past", manifest.dims.head_dim]
    outputs = [o.name for o in graph.output]
    assert outputs[:2] == ["logits", "hidden_states"]
    assert f"new_value_{manifest.dims.num_layers - 1}" in outputs

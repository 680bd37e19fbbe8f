"""tree_attention_op: one `treespec::TreeAttention` node in a dynamo ONNX export, reference in eager."""
from __future__ import annotations

import math

import pytest
import torch

from treespec.plugins.tree_attention.check import Case, make_inputs
from treespec.plugins.tree_attention.onnx_op import DOMAIN, OP_TYPE, tree_attention_op
from treespec.plugins.tree_attention.reference import tree_attention_reference

onnx = pytest.importorskip("onnx")


class TinyVerify(torch.nn.Module):
    """Projections around the op, as in the exported graphs: q/k/v come from activations."""

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 2, scale: float = 0.3):
        super().__init__()
        self.heads, self.kv_heads, self.dim, self.scale = heads, kv_heads, dim, scale
        self.q = torch.nn.Linear(heads * dim, heads * dim, bias=False)
        self.k = torch.nn.Linear(heads * dim, kv_heads * dim, bias=False)
        self.v = torch.nn.Linear(heads * dim, kv_heads * dim, bias=False)

    def forward(self, x, tree_mask, past_lengths, past_k, past_v):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.dim).transpose(1, 2)
        out = tree_attention_op(q, k, v, past_k, past_v, past_lengths, tree_mask, self.scale)
        return out.transpose(1, 2).reshape(b, t, -1) * 2.0


def example(batch: int = 2, tokens: int = 5, capacity: int = 12):
    torch.manual_seed(0)
    x = torch.randn(batch, tokens, 64)
    mask = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool)).expand(batch, -1, -1).clone()
    lengths = torch.tensor([capacity, 3], dtype=torch.int64)
    return x, mask, lengths, torch.randn(batch, 2, capacity, 16), torch.randn(batch, 2, capacity, 16)


def test_eager_is_reference():
    inputs = make_inputs(Case(seed=3, batch=2, heads=6, kv_heads=2, tokens=7, head_dim=16, capacity=20,
                              past_lengths=(20, 4)))
    inputs.pop("scale")
    ref = tree_attention_reference(**inputs)
    torch.testing.assert_close(tree_attention_op(**inputs), ref)
    torch.testing.assert_close(tree_attention_op(**inputs, scale=0.0), ref)  # <= 0: 1/sqrt(D)
    scaled = tree_attention_reference(**inputs, scale=0.5)
    torch.testing.assert_close(tree_attention_op(**inputs, scale=0.5), scaled)


def test_dynamo_export_emits_one_tree_attention_node(tmp_path):
    model = TinyVerify().eval()
    args = example()
    path = tmp_path / "tree_attention.onnx"
    torch.onnx.export(model, args, str(path), dynamo=True, opset_version=23,
                      input_names=["x", "tree_mask", "past_lengths", "past_k", "past_v"],
                      dynamic_shapes=({0: "B", 1: "T"}, {0: "B", 1: "T", 2: "T"}, {0: "B"},
                                      {0: "B", 2: "C"}, {0: "B", 2: "C"}))
    graph_model = onnx.load(str(path))
    onnx.checker.check_model(graph_model)
    graph = graph_model.graph
    nodes = [n for n in graph.node if n.op_type == OP_TYPE]
    assert len(nodes) == 1 and nodes[0].domain == DOMAIN
    assert {o.domain: o.version for o in graph_model.opset_import}.get(DOMAIN) == 1
    node = nodes[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"treespec" and attrs["aot"] == 1
    assert math.isclose(attrs["scale"], 0.3, rel_tol=1e-6)
    assert len(node.input) == 7 and len(node.output) == 1

    producers = {out: n for n in graph.node for out in n.output}
    graph_inputs = {i.name for i in graph.input}

    def source(name):  # follow Cast/Reshape/Transpose back to a graph input or an op type
        seen = []
        while name not in graph_inputs and name in producers:
            seen.append(producers[name].op_type)
            if producers[name].op_type not in ("Cast", "Transpose", "Reshape", "Identity"):
                break
            name = producers[name].input[0]
        return name, seen

    past_k, past_v, lengths, mask = (source(node.input[i]) for i in (3, 4, 5, 6))
    assert past_k[0] == "past_k" and past_v[0] == "past_v"
    assert lengths[0] == "past_lengths" and "Cast" in lengths[1]
    assert mask[0] == "tree_mask" and "Cast" in mask[1]
    for i, to in ((5, onnx.TensorProto.INT32), (6, onnx.TensorProto.INT32)):
        cast = producers[node.input[i]]
        assert cast.op_type == "Cast" and onnx.helper.get_attribute_value(cast.attribute[0]) == to
    for i in (0, 1, 2):  # q, k_new, v_new come from the projections
        assert "MatMul" in source(node.input[i])[1] or "Gemm" in source(node.input[i])[1]

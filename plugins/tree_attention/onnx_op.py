"""`tree_attention_op`: tree attention that exports as one custom ONNX node for TensorRT.

Under `torch.onnx.export(..., dynamo=True)` it emits a single node

    treespec::TreeAttention(q, k_new, v_new, past_k, past_v, past_lengths, tree_mask) -> out
        q [B,H,T,D], k_new/v_new [B,KVH,T,D], past_k/past_v [B,KVH,C,D]: one float dtype
        past_lengths int32 [B]      (Cast inserted in front of the node when given int64)
        tree_mask    int32 [B,T,T]  (Cast from bool: TensorRT plugin I/O has no reliable bool)
        out          like q
        attributes: scale (float; <= 0 means 1/sqrt(D)), plugin_namespace = "treespec" and
        aot = 1 — the two that TensorRT's ONNX parser reads to map the node to the AOT
        implementation of the Quick Deployable Plugin `treespec::TreeAttention` (trt_plugin.py).

In eager mode it computes the PyTorch reference (fp32 math, result in q's dtype), so an
exported model and the module it came from agree.
"""
from __future__ import annotations

import torch

from .reference import tree_attention_reference

DOMAIN = "treespec"
OP_TYPE = "TreeAttention"
INPUT_NAMES = ("q", "k_new", "v_new", "past_k", "past_v", "past_lengths", "tree_mask")


def node_attributes(scale: float | None) -> dict[str, float | str | int]:
    return {"scale": float(scale) if scale is not None else 0.0, "plugin_namespace": DOMAIN, "aot": 1}


def tree_attention_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, past_k: torch.Tensor,
                      past_v: torch.Tensor, past_lengths: torch.Tensor, tree_mask: torch.Tensor,
                      scale: float | None = None) -> torch.Tensor:
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{OP_TYPE}",
            (q, k_new, v_new, past_k, past_v, past_lengths.to(torch.int32), tree_mask.to(torch.int32)),
            attrs=node_attributes(scale),
            dtype=q.dtype,
            shape=q.shape,
            version=1,
        )
    scale = None if scale is None or scale <= 0 else scale
    return tree_attention_reference(q, k_new, v_new, past_k, past_v, past_lengths, tree_mask, scale).to(q.dtype)

"""Triton kernels of the torch backend's few-kernel decoder step (treespec.models.fused_decoder)."""

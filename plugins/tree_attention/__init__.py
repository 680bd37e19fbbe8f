"""Tree (verification) attention: PyTorch reference, Triton kernel, AOT PTX, TensorRT plugin, ONNX op.

Submodules are imported explicitly (`from treespec.plugins.tree_attention.kernel import ...`)
so that importing this package needs neither Triton nor TensorRT.
"""

"""treespec: tree-based speculative decoding exported to ONNX / TensorRT / Triton."""
__version__ = "0.1.0"

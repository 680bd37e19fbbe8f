"""`treespec serve`: the artifacts behind a real Triton Inference Server (runtime/triton/server.py)."""
from treespec.runtime.triton.server import add_arguments, run  # noqa: F401

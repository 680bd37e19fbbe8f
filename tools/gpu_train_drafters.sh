#!/usr/bin/env bash
# Trains the committed SmolLM2 drafters on a CUDA GPU (the exact command behind
# drafters/smollm2/*.safetensors). Usage, from the repo root: bash tools/gpu_train_drafters.sh OUTDIR
set -euo pipefail
out=${1:?output folder}
source tools/gpu_env.sh
mkdir -p "$out"
common=(--model smollm2-135m --device cuda --seed 0 --dataset "$out/selfdistill.dataset.safetensors"
        --sequences 3072 --new-tokens 192 --batch-size 32 --force)
python3 -m treespec.runtime.cli train-medusa --out "$out/medusa-smollm2.safetensors" "${common[@]}" \
  --num-heads 4 --steps 1500 --lr 1e-3 2>&1 | tr '\r' '\n' | grep -v "it/s]$" | tail -n 40
python3 -m treespec.runtime.cli train-draft --out "$out/draft-smollm2.safetensors" "${common[@]}" \
  --num-layers 3 --steps 1500 --lr 5e-4 2>&1 | tr '\r' '\n' | grep -v "it/s]$" | tail -n 40
rm -f "$out"/*.ckpt.safetensors
ls -la "$out"

#!/usr/bin/env bash
# Trains the committed SmolLM2 drafters (weights/smollm2/*.safetensors) on a CUDA GPU: the exact
# commands behind them. From the repo root: bash tools/gpu_train_drafters.sh OUTDIR [medusa|draft|both]
# Both share one self-distillation dataset (the target's greedy answers to 8192 prompts built
# from local Python sources/docs + 4096 raw-text windows), cached in OUTDIR.
set -euo pipefail
out=${1:?output folder}; which=${2:-both}
source tools/gpu_env.sh
mkdir -p "$out"
common=(--model smollm2-135m --device cuda --seed 0 --dataset "$out/selfdistill.dataset.safetensors"
        --sequences 8192 --corpus-windows 4096 --generate-batch 512 --new-tokens 192 --batch-size 32 --force)
quiet() { tr '\r' '\n' | grep -v "step/s\|seq/s\|it/s" | tail -n 12; }
if [ "$which" != draft ]; then
  python3 -m treespec.runtime.cli train-medusa --out "$out/medusa.safetensors" "${common[@]}" \
    --num-heads 4 --steps 1200 --lr 1e-3 2>&1 | quiet
fi
if [ "$which" != medusa ]; then
  python3 -m treespec.runtime.cli train-draft --out "$out/draft.safetensors" "${common[@]}" \
    --num-layers 3 --steps 1500 --lr 5e-4 2>&1 | quiet
fi
rm -f "$out"/*.ckpt.safetensors

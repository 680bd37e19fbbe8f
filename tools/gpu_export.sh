#!/usr/bin/env bash
# Export SmolLM2-135M-Instruct with the committed trained drafters on the GPU machine (the export
# itself runs on its CPUs): tools/gpu_export.sh OUTDIR PRECISION ATTENTION DRAFTERS(comma list).
# Writes OUTDIR.done when the export succeeded, so a job started meanwhile can wait for it.
# WEIGHTS: the folder of the drafters' weights (default weights/smollm2), e.g. a head to compare.
set -uo pipefail
out=${1:?OUTDIR}; precision=${2:-fp32}; attention=${3:-decomposed}; drafters=${4:-draft,medusa,lookup}
source tools/gpu_env.sh
start=$(date +%s)
rm -f "$out.done"
args=()
for d in ${drafters//,/ }; do
  args+=(--drafter "$d")
  [ "$d" != lookup ] && args+=(--drafter-weights "$d=${WEIGHTS:-weights/smollm2}/$d.safetensors")
done
timeout 400 python3 -m treespec.exporter.cli smollm2-135m --out "$out" --force --precision "$precision" \
  --attention "$attention" "${args[@]}" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -4
[ -f "$out/manifest.json" ] && touch "$out.done"
echo "export of $out ($precision, $attention, $drafters) took $(( $(date +%s) - start )) s"

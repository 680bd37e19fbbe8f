#!/usr/bin/env bash
# Wheels for the GPU machine, which has no network, in parts small enough for one `run` call each
# (a call carries at most 64 MiB with the working tree: ~41 MB of tracked files in Dec 2026, so pieces
# of 18 MB, e.g. `pack .gpuparts 18000000 STREAM...`; 27.5 MB ones no longer fit). Streams are .tar.xz archives of a `site`
# folder (as ../shared/tools/wheel-parts.sh makes them); several are concatenated and split.
#   here:  tools/gpu_parts.sh pack OUTDIR BYTES STREAM...   -> OUTDIR/1/piece.00, OUTDIR/2/piece.01, ...
#   there: tools/gpu_parts.sh stash PARTDIR                  (keeps the piece in $STASH)
#          tools/gpu_parts.sh install-first TARGET           (unpacks the first stream while pieces of
#                                                             later ones are still to come)
#          tools/gpu_parts.sh install TARGET                 (joins all stashed pieces, unpacks what
#                                                             is not there yet)
set -euo pipefail
stash=${STASH:-/tmp/tsparts}
case "${1:-}" in
  pack)
    out=${2:?OUTDIR}; size=${3:?BYTES}; shift 3
    rm -rf "$out"; mkdir -p "$out"
    cat "$@" | split -b "$size" -d -a 2 - "$out/piece."
    n=0
    for p in "$out"/piece.*; do n=$((n + 1)); mkdir -p "$out/$n"; mv "$p" "$out/$n/"; done
    echo "$n parts in $out" ;;
  stash)
    mkdir -p "$stash"; cp "${2:?PARTDIR}"/piece.* "$stash"/
    echo "stashed: $(ls "$stash" | tr '\n' ' ')" ;;
  install-first)
    target=${2:?TARGET}; mkdir -p "$target"
    (cat "$stash"/piece.* | xz -d 2>/dev/null || true) | tar -C "$target" --strip-components=1 -xf -
    echo "unpacked into $target: $(ls "$target" | tr '\n' ' ')" ;;
  install)
    target=${2:?TARGET}; mkdir -p "$target"
    cat "$stash"/piece.* | xz -d | tar -i --skip-old-files -C "$target" --strip-components=1 -xf -
    echo "unpacked into $target: $(ls "$target" | tr '\n' ' ')" ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac

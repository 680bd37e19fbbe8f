# Source on the GPU machine (from the repo root): makes `treespec` importable without installing,
# using wheels unpacked into /tmp/site by ../shared/tools/wheel-parts.sh parts.
tsp=${TREESPEC_SRC:-/tmp/treespec-src}
rm -rf "$tsp"; mkdir -p "$tsp/treespec"
cp -r treespec_pkg/. "$tsp/treespec/"
for d in exporter runtime plugins configs; do ln -s "$PWD/$d" "$tsp/treespec/$d"; done
export PYTHONPATH="/tmp/site:$tsp${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

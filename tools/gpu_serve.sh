#!/usr/bin/env bash
# The GPU serving run (issue 17), one `run` call on the H200 from the repo root, after
#   * the wheel parts are installed (tools/gpu_parts.sh install /tmp/site: nvidia-pytriton, tritonclient,
#     the llm/gguf wheels...) and
#   * the fp16 artifacts with every drafter are exported to $ART (tools/gpu_export.sh "$ART" fp16 ...).
# Steps, each under its own `timeout`, everything logged to $OUT (a failure still brings back evidence):
#   0. preflight: imports, CUDA, the python-backend stub's numpy (Triton's stub garbles numpy 2 arrays:
#      if this machine's numpy is 2.x, numpy 1.26 must sit in $NUMPY1/numpy, e.g. a wheel part unpacked
#      there: tools/gpu_parts.sh install "$NUMPY1"; else the run stops here with one line saying so);
#   1. the Python API's batch-1 speculative tok/s on the same prompts (EAGLE, its default tree, torch,
#      CUDA): the bar for "the server at 1 stream gives >= 90% of it"; its outputs are kept;
#   2. `treespec serve --backend torch --device cuda --batch-slots $SLOTS --drafter eagle` in the background;
#   3. `treespec loadtest` at $LEVELS streams, speculative (the server's default tree) and plain
#      (tree none) through that one server, every output checked against the same request sent alone;
#   4. the metrics endpoint, a summary (server vs API, speculative vs plain, server outputs vs the API's),
#      the server stopped.
# Env: ART (required), OUT, SLOTS (64), LEVELS (1,8,32,64), TOKENS (128 per request), PROMPTS (40),
#      LIMIT (280 s for the whole call), NUMPY1 (/tmp/numpy1), PORT (8000), TREE (server default tree),
#      DEVICE (cuda; cpu for a dry run of this script on a CPU machine), DRAFTER (eagle),
#      SIZING (the server's --tree-sizing: load, its default, or fixed),
#      GPUS (N or all: one instance group per GPU, issue 18; LEVELS then e.g. 8,16,32,64 for 8 x N streams),
#      FUSED (TREESPEC_TORCH_FUSED for the API and the server, e.g. triton: Triton GEMMs instead of cuBLAS,
#      whose kernel choice may change with the batch width and so flip a near-tie argmax between a request
#      alone and the same request in a batch: the loadtest's mismatch count says whether it does),
#      PYSPY (seconds: py-spy samples the model's Python stub, every thread, from the loadtest's start,
#      i.e. its requests sent alone, or from PYSPY_AT seconds later, into $OUT/pyspy.txt; needs py-spy on
#      PATH or in /tmp/site). The loadtest's JSON has each level's engine time per step (admit, draft,
#      target, host: the server's treespec_engine_*_seconds_total), and the summary repeats it.
# Files in $OUT: gpu_serve.log, api_batch1.json, serve.log, tritonserver.log, loadtest.json,
#      loadtest.png, metrics.txt, summary.json.
set -uo pipefail
ART=${ART:?set ART to the exported fp16 artifact directory}
OUT=${OUT:-/tmp/out}; SLOTS=${SLOTS:-64}; LEVELS=${LEVELS:-1,8,32,64}; TOKENS=${TOKENS:-128}
PROMPTS=${PROMPTS:-40}; LIMIT=${LIMIT:-280}; NUMPY1=${NUMPY1:-/tmp/numpy1}; PORT=${PORT:-8000}
DEVICE=${DEVICE:-cuda}; DRAFTER=${DRAFTER:-eagle}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_serve.log") 2>&1
start=$(date +%s)
left() { local s=$(( LIMIT - ($(date +%s) - start) )); echo $(( s > 10 ? s : 10 )); }
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) source tools/gpu_env.sh ;; esac
export TREESPEC_NO_AUTO_INSTALL=1 TREESPEC_CACHE=/tmp/treespec-cache
[ -n "${FUSED:-}" ] && export TREESPEC_TORCH_FUSED=$FUSED
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader

# 0. preflight ----------------------------------------------------------------------------------
stamp "preflight"
# Wheel parts are unpacked like zip files, which keep no executable bits: the server and its stub need them.
pytriton_dir=$(python3 -c "import importlib.util as u; print(u.find_spec('pytriton').submodule_search_locations[0])" 2>/dev/null)
[ -n "$pytriton_dir" ] && chmod -R u+x "$pytriton_dir/tritonserver/bin" "$pytriton_dir/tritonserver/backends"
timeout 60 python3 - "$NUMPY1" "$DEVICE" <<'EOF' || { stamp "preflight failed: see above"; exit 3; }
import os, sys, sysconfig, importlib.util
import numpy, torch
print(f"python {sys.version.split()[0]}, numpy {numpy.__version__}, torch {torch.__version__}, "
      f"cuda {torch.cuda.is_available()}, libpython dir {sysconfig.get_config_var('LIBDIR')}")
assert sys.argv[2] != "cuda" or torch.cuda.is_available(), "torch sees no CUDA device"
from treespec.runtime.triton.env import TritonInstall
TritonInstall()  # the tritonserver binary, its libraries and this Python's stub
from treespec.exporter.triton_repo import _pb
_pb()  # tritonclient's ModelConfig protobuf
from treespec.runtime.triton.env import stub_numpy_target
chosen = ""
if int(numpy.__version__.split(".")[0]) >= 2:
    found = [f for f in (os.environ.get("TREESPEC_TRITON_NUMPY_DIR"), sys.argv[1], str(stub_numpy_target()))
             if f and os.path.isfile(os.path.join(f, "numpy", "__init__.py"))]
    if not found:
        sys.exit(f"numpy {numpy.__version__} here: the Triton stub needs numpy 1.26 in {sys.argv[1]}/numpy "
                 "(carry numpy==1.26.4 as a wheel part and unpack it there)")
    chosen = found[0]
    print(f"the stub's numpy: {chosen}")
open("/tmp/treespec-stub-numpy", "w").write(chosen)
EOF
numpy_dir=$(cat /tmp/treespec-stub-numpy 2>/dev/null)
[ -n "$numpy_dir" ] && export TREESPEC_TRITON_NUMPY_DIR=$numpy_dir
if [ -n "$numpy_dir" ]; then  # what the stub will do, in seconds rather than at the server's start
  stamp "preflight: the generator under the stub's numpy"
  PYTHONPATH="$numpy_dir:$PYTHONPATH" timeout 120 python3 - "$ART" "$DEVICE" "$DRAFTER" <<'EOF' \
    || { stamp "preflight failed: the model cannot load under the stub's numpy"; exit 3; }
import importlib.util, sys
import numpy
spec = importlib.util.spec_from_file_location("repo_model", "runtime/triton/repo_model.py")
repo_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(repo_model)
repo_model._hide_numpy2_only_packages([p for p in sys.path if p.endswith(("site-packages", "dist-packages"))])
from treespec.runtime.api import SpeculativeGenerator
gen = SpeculativeGenerator.from_artifacts(sys.argv[1], backend="torch", device=sys.argv[2], drafter=sys.argv[3])
print(f"numpy {numpy.__version__}: {gen.generate('Hello', max_new_tokens=8).text!r}")
EOF
fi

# 1. the Python API, batch 1 ----------------------------------------------------------------------
stamp "Python API batch-1 speculative tok/s on $PROMPTS prompts x $TOKENS tokens"
timeout 90 python3 - "$ART" "$PROMPTS" "$TOKENS" "$OUT/api_batch1.json" "${TREE:-}" "$DEVICE" "$DRAFTER" <<'EOF'
import json, sys, time
from treespec.runtime.api import SpeculativeGenerator
from treespec.runtime.prompts import BUNDLED_BENCH, read_prompts
art, n, tokens, out, tree = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] or None
prompts = read_prompts(BUNDLED_BENCH, n)
gen = SpeculativeGenerator.from_artifacts(art, backend="torch", device=sys.argv[6], drafter=sys.argv[7], tree=tree)
for p in prompts[:3]:  # warm-up: CUDA graphs of the target and the draft
    gen.generate(p, max_new_tokens=tokens)
rows, made, spent = [], 0, 0.0
for p in prompts:
    t0 = time.perf_counter()
    r = gen.generate(p, max_new_tokens=tokens)
    spent += time.perf_counter() - t0
    made += len(r.token_ids)
    rows.append({"ids": list(r.token_ids), "mean_accepted": r.stats.get("mean_accepted")})
result = {"tokens_per_s": round(made / spent, 2), "tokens": made, "seconds": round(spent, 3),
          "tree": str(gen.default_tree), "prompts": len(prompts), "max_tokens": tokens, "outputs": rows}
json.dump(result, open(out, "w"), indent=1)
print(f"API batch 1: {result['tokens_per_s']} tok/s ({made} tokens in {spent:.1f} s), tree {gen.default_tree}")
EOF
stamp "API done (exit $?)"

# 2. the server -----------------------------------------------------------------------------------
stamp "starting treespec serve (torch, $DEVICE, $DRAFTER, $SLOTS slots)"
python3 -m treespec.runtime.cli serve --artifacts "$ART" --backend torch --device "$DEVICE" --drafter "$DRAFTER" \
  ${TREE:+--tree "$TREE"} ${GPUS:+--gpus "$GPUS"} ${SIZING:+--tree-sizing "$SIZING"} --batch-slots "$SLOTS" --port "$PORT" --grpc-port $((PORT + 1)) \
  --metrics-port $((PORT + 2)) --repo /tmp/treespec-repo --log-file "$OUT/tritonserver.log" > "$OUT/serve.log" 2>&1 &
serve_pid=$!
stop_server() {
  kill -TERM "$serve_pid" 2>/dev/null
  for _ in $(seq 40); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$serve_pid" 2>/dev/null
  stamp "server stopped"; tail -5 "$OUT/serve.log"
}
trap stop_server EXIT
for _ in $(seq 240); do
  grep -q "^ready in" "$OUT/serve.log" && break
  kill -0 "$serve_pid" 2>/dev/null || break
  sleep 0.5
done
cat "$OUT/serve.log"
if ! grep -q "^ready in" "$OUT/serve.log"; then
  stamp "the server did not become ready"; tail -40 "$OUT/tritonserver.log"; exit 4
fi

# 3. the load test ----------------------------------------------------------------------------------
stamp "loadtest at $LEVELS streams, speculative and plain ($(left) s left)"
if [ -n "${PYSPY:-}" ]; then
  spy=$(command -v py-spy || ls /tmp/site/py_spy-*.data/scripts/py-spy 2>/dev/null | head -1)
  stub=$(pgrep -f triton_python_backend_stub | head -1)
  [ -n "$spy" ] && chmod +x "$spy" && [ -n "$stub" ] && (sleep "${PYSPY_AT:-0}"; "$spy" record --pid "$stub" \
    --duration "$PYSPY" --rate 500 --threads --format raw --nonblocking --output "$OUT/pyspy.txt") > "$OUT/pyspy.log" 2>&1 &
fi
timeout $(( $(left) - 25 )) python3 -m treespec.runtime.cli loadtest --url "http://127.0.0.1:$PORT" \
  --levels "$LEVELS" --trees default,none --max-tokens "$TOKENS" --num-prompts "$PROMPTS" \
  --timeout 60 --out "$OUT/loadtest"
stamp "loadtest exit $?"

# 4. metrics and the summary -------------------------------------------------------------------------
timeout 10 curl -s "http://127.0.0.1:$((PORT + 2))/metrics" | grep "^treespec_\|^nv_inference_count" > "$OUT/metrics.txt"
timeout 30 python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
api, load_ = load("api_batch1.json"), load("loadtest.json")
summary = {}
if load_:
    rows = {(r["mode"], r["clients"]): r for r in load_["results"]}
    summary["levels"] = [{"clients": c, "speculative_tok_s": rows[("default", c)]["total_tokens_per_s"],
                          "plain_tok_s": rows[("none", c)]["total_tokens_per_s"],
                          "x_vs_plain": round(rows[("default", c)]["total_tokens_per_s"]
                                              / max(rows[("none", c)]["total_tokens_per_s"], 1e-9), 3),
                          "budget_p50": rows[("default", c)].get("budget_p50"),
                          "tokens_per_step": rows[("default", c)].get("server_tokens_per_step"),
                          "plain_under_load": rows[("default", c)].get("plain_under_load"),
                          "speculative_ms_per_step": rows[("default", c)].get("server_ms_per_step"),
                          "plain_ms_per_step": rows[("none", c)].get("server_ms_per_step"),
                          "errors": rows[("default", c)]["errors"] + rows[("none", c)]["errors"],
                          "mismatches": rows[("default", c)]["mismatches"] + rows[("none", c)]["mismatches"]}
                         for c in load_["levels"] if ("default", c) in rows and ("none", c) in rows]
    if api and ("default", 1) in rows:
        summary["server_1_stream_vs_api_batch1"] = round(rows[("default", 1)]["total_tokens_per_s"]
                                                         / api["tokens_per_s"], 3)
    if api and "default" in load_["reference"]:
        server_ids = load_["reference"]["default"]["ids"]
        api_ids = [r["ids"] for r in api["outputs"]][:len(server_ids)]
        summary["server_outputs_equal_api"] = sum(a == b for a, b in zip(api_ids, server_ids))
        summary["compared_with_api"] = len(api_ids)
if api:
    summary["api_batch1_tok_s"] = api["tokens_per_s"]
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
tail -c 1500000 "$OUT/tritonserver.log" > "$OUT/tritonserver.log.tail" 2>/dev/null && mv "$OUT/tritonserver.log.tail" "$OUT/tritonserver.log"
grep -E "^E[0-9]|Traceback|error" "$OUT/tritonserver.log" | head -20
stamp "total"

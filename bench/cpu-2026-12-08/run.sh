cd /work/main
.venv/bin/treespec serve --artifacts artifacts/smollm2 --drafter eagle --batch-slots 8 --port 8100 --grpc-port 8101 --metrics-port 8102 --repo /tmp/cpuserve/repo > /tmp/cpuserve/serve.log 2>&1 &
pid=$!
for i in $(seq 300); do grep -q "^ready in" /tmp/cpuserve/serve.log && break; sleep 1; done
cat /tmp/cpuserve/serve.log
timeout 1500 .venv/bin/treespec loadtest --url http://127.0.0.1:8100 --metrics-url http://127.0.0.1:8102/metrics --levels 1,8 --trees default,none --max-tokens 48 --num-prompts 8 --out /tmp/cpuserve/load 2>&1 | tail -25
curl -s http://127.0.0.1:8102/metrics | grep "^treespec_" | grep -v "_bucket\|steps_by" | head -30
kill -TERM $pid; sleep 5

"""The real Triton server (nvidia-pytriton's tritonserver 2.51, CPU) serving the SmolLM2 artifacts,
behind the HTTP front and with its supervisor (runtime/triton/service.py), as `treespec serve` runs it.

One service for the module. Greedy outputs over HTTP generate, HTTP generate_stream (SSE) and gRPC
streaming equal the Python API's and plain decoding's (tree "none"); 8 concurrent streaming clients
x 3 requests all complete correctly with no errors in the server log; bad requests get clear
errors and the server goes on serving; metrics appear; `serve()` restarts on the unchanged
repository (this last test stops the module's service).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from support.triton_helpers import (LEFT, MAX_TOKENS, PROMPTS, TIMEOUT, expected_outputs, grpc_stream,
                            http_generate, http_post, ids_of, metrics, repo_snapshot, sse_events)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(smollm2_artifacts):
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(smollm2_artifacts)
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def expected(api):
    """Greedy outputs of the Python API, checked equal to plain autoregressive decoding."""
    spec = expected_outputs(api)
    plain = expected_outputs(api, tree="none")
    assert spec == plain, "speculative greedy decoding differs from plain decoding in the Python API"
    return spec


@pytest.fixture(scope="module")
def repo(smollm2_artifacts, tmp_path_factory):
    from treespec.exporter.triton_repo import write_triton_repo

    return write_triton_repo(smollm2_artifacts, tmp_path_factory.mktemp("triton") / "repo")


@pytest.fixture(scope="module")
def server(repo, expected):  # expected first: the references are computed before the server loads
    from treespec.runtime.triton.service import TritonService

    with TritonService(repo, None, None, None, startup_timeout=600) as srv:
        print(f"\ntritonserver ready in {srv.server.startup_s:.1f} s")
        yield srv


def test_http_generate_equals_the_python_api_and_plain_decoding(server, expected):
    for i, (prompt, (text, ids)) in enumerate(expected.items()):
        for tree in (None, "none") if i < 2 else (None,):
            body = {"text_input": prompt, "max_tokens": MAX_TOKENS}
            if tree:
                body["tree"] = tree
            code, out = http_generate(server, body)
            assert code == 200, out
            assert out["text_output"] == text and ids_of(out["output_ids"]) == ids, (prompt, tree)
            assert out["accepted_tokens"] == len(ids)


def test_http_generate_stream_sends_one_event_per_step(server, expected):
    prompt = PROMPTS[1]
    code, body = http_post(f"{server.http_url}/v2/models/treespec/generate_stream",
                           {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True})
    assert code == 200, body
    events = sse_events(body)
    assert "".join(e["text_output"] for e in events) == expected[prompt][0]
    assert [t for e in events for t in ids_of(e["output_ids"])] == expected[prompt][1]
    assert sum(e["accepted_tokens"] for e in events) == len(expected[prompt][1]) and len(events) > 1


def test_grpc_streaming_equals_the_python_api(server, api, expected):
    for i, (prompt, (text, ids)) in enumerate(expected.items()):
        out = grpc_stream(server.grpc_url, prompt)
        assert out.ok, out.error
        assert out.text == text and out.ids == ids
        assert sum(out.accepted) == len(ids) and out.responses == len(out.accepted) > 1
        if i < 2:
            whole = grpc_stream(server.grpc_url, prompt, stream=False, tree="none")
            assert whole.ok and whole.responses == 1 and whole.ids == ids
    # the token interface: ids in, ids out (no chat template applied by the server)
    prompt = PROMPTS[0]
    out = grpc_stream(server.grpc_url, input_ids=api.encode(prompt))
    assert out.ok and out.ids == expected[prompt][1]


def test_eight_concurrent_streaming_clients(server, api, expected):
    n = MAX_TOKENS // 2  # greedy: the first n tokens of the references
    want = {p: (api.tokenizer.decode(ids[:n], skip_special_tokens=True), ids[:n]) for p, (_, ids) in expected.items()}
    results: dict[tuple[int, int], object] = {}

    def client(c: int) -> None:
        for r in range(3):
            prompt = PROMPTS[(c + r) % len(PROMPTS)]
            results[(c, r)] = (prompt, grpc_stream(server.grpc_url, prompt, max_tokens=n))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    elapsed = time.perf_counter() - t0
    assert len(results) == 24
    for (c, r), (prompt, out) in sorted(results.items()):
        assert out.ok, f"client {c} request {r}: {out.error}"
        assert out.text == want[prompt][0] and out.ids == want[prompt][1], (c, r)
    print(f"\n24 streaming requests from 8 clients in {elapsed:.1f} s")
    assert server.server.error_lines() == []


BAD_REQUESTS = [
    ({"max_tokens": 8}, 400, "missing input: give text_input"),
    ({"text_input": "Hi", "max_tokens": -3}, 400, "max_tokens must be an integer in [1, 1048576], got -3"),
    ({"text_input": "Hi", "max_tokens": 0}, 400, "max_tokens must be an integer in [1, 1048576], got 0"),
    ({"text_input": "Hi", "max_tokens": 2 ** 31 - 1}, 400, "max_tokens must be an integer in [1, 1048576], got 2147483647"),
    ({"text_input": "OVER_CONTEXT", "max_tokens": 8}, 400, "the context limit is"),
    ({"text_input": "Hi", "max_tokens": "eight"}, 400, "max_tokens must be an integer"),
    ({"text_input": "Hi", "temperature": -1.0}, 400, "temperature must be >= 0"),
    ({"text_input": "Hi", "top_p": 0.0}, 400, "top_p must be in (0, 1]"),
    ({"text_input": "Hi", "tree": "{not json"}, 400, "tree: invalid JSON"),
    ({"text_input": "Hi", "tree": "no-such-preset"}, 400, "unknown tree 'no-such-preset'"),
    ({"text_input": "Hi", "tree": "/etc/passwd"}, 400, "unknown tree '/etc/passwd'"),
    ({"text_input": "", "max_tokens": 8}, 400, "the prompt is empty"),
    ({"text_input": "Hi", "input_ids": [1, 2]}, 400, "either text_input or input_ids"),
    ({"input_ids": [1, 10 ** 9]}, 400, "input_ids must lie in"),
]


@pytest.mark.parametrize("body,code,message", BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_http_requests_get_clear_errors(server, api, body, code, message):
    if body.get("text_input") == "OVER_CONTEXT":
        body = {**body, "text_input": "word " * (api.max_context + 8)}
    got, out = http_generate(server, body)
    assert got >= 400 and (code is None or got == code), out
    assert message in out["error"], out


def test_bad_grpc_requests_then_a_good_one(server, expected):
    import numpy as np

    def wrong_type(tg):
        text = tg.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"Hi"], dtype=np.object_))
        tokens = tg.InferInput("max_tokens", [1], "FP32")
        tokens.set_data_from_numpy(np.array([8.0], dtype=np.float32))
        return [text, tokens]

    out = grpc_stream(server.grpc_url, raw_inputs=wrong_type)
    assert out.error and "max_tokens" in out.error and "expects 'INT32'" in out.error, out.error
    out = grpc_stream(server.grpc_url, max_tokens=4)
    assert out.error and "missing input" in out.error
    out = grpc_stream(server.grpc_url, "Hi", max_tokens=-1)
    assert out.error and "max_tokens must be an integer in [1, 1048576], got -1" in out.error
    prompt = PROMPTS[2]
    out = grpc_stream(server.grpc_url, prompt)
    assert out.ok and out.ids == expected[prompt][1]
    code, body = http_generate(server, {"text_input": prompt, "max_tokens": MAX_TOKENS})
    assert code == 200 and ids_of(body["output_ids"]) == expected[prompt][1]
    assert server.server.error_lines() == []  # bad requests are answered, not logged as server errors


def test_a_cancelled_stream_stops_generating(server, expected):
    """A client that goes away mid-stream: the model sees the cancellation at its next step and
    moves on to the next request instead of generating for nobody."""
    before = metrics(server)['treespec_requests_total{model="treespec",outcome="cancelled"}']
    leave = grpc_stream(server.grpc_url, PROMPTS[0], max_tokens=200, on_response=lambda p: p.responses < 2)
    assert leave.responses == 2 and leave.error == LEFT
    prompt = PROMPTS[1]
    t0 = time.perf_counter()
    out = grpc_stream(server.grpc_url, prompt)
    assert out.ok and out.ids == expected[prompt][1]
    alone = time.perf_counter() - t0
    deadline = time.monotonic() + 30
    while metrics(server)['treespec_requests_total{model="treespec",outcome="cancelled"}'] == before:
        assert time.monotonic() < deadline, "the cancellation was not counted"
        time.sleep(0.2)
    print(f"\nrequest after a cancelled 200-token stream took {alone:.1f} s")


def test_acceptance_metrics_on_the_metrics_endpoint(server):
    assert http_generate(server, {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS})[0] == 200
    assert http_generate(server, {"text_input": "Hi", "max_tokens": -1})[0] == 400
    m = metrics(server)
    label = '{model="treespec"}'
    steps = m[f"treespec_steps_total{label}"]
    assert m[f"treespec_tokens_total{label}"] > steps > 0
    by_tokens = {int(key.split('tokens="')[1].split('"')[0]): n for key, n in m.items()
                 if key.startswith("treespec_steps_by_tokens_total{")}
    assert sum(by_tokens.values()) == steps and min(by_tokens) >= 1
    mean = sum(k * n for k, n in by_tokens.items()) / steps
    gauge = m['treespec_mean_accepted_tokens{instance="treespec_0_0",model="treespec"}']  # one instance
    assert mean >= 1.0 and abs(gauge - mean) < 1e-6
    assert m['treespec_requests_total{model="treespec",outcome="success"}'] > 0
    assert m['treespec_requests_total{model="treespec",outcome="invalid"}'] > 0
    print(f"\nmean accepted tokens per step: {mean:.3f} over {steps:.0f} steps")


def test_restart_with_serve_reuses_the_repository_unchanged(server, repo, smollm2_artifacts, expected, tmp_path):
    """Runs last: stops the module's service, then runs `treespec serve` on the same repository."""
    from treespec.runtime.triton.server import free_port

    t0 = time.perf_counter()
    assert server.stop() == 0, server.server.log_tail()  # every request of this module was released
    print(f"\nthe module's server stopped in {time.perf_counter() - t0:.1f} s")
    before = repo_snapshot(repo)
    for _ in range(1):
        port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        command = [sys.executable, "-m", "treespec.runtime.cli", "serve", "--artifacts", str(smollm2_artifacts),
                   "--port", str(port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                   "--repo", str(repo)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, "TREESPEC_CACHE": str(tmp_path)})
        lines = []
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if "Ctrl-C stops the server" in line:
                    break
            out = "".join(lines)
            assert "(reused)" in out and f"http://127.0.0.1:{port}" in out, out
            prompt = PROMPTS[3]
            got, body = http_post(f"http://127.0.0.1:{port}/v2/models/treespec/generate",
                                  {"text_input": prompt, "max_tokens": MAX_TOKENS})
            assert got == 200 and f'"text_output":' in body
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=120)
            print(f"\ntreespec serve stopped {time.perf_counter() - t0:.1f} s after SIGTERM")
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0 and "stopped (exit code 0)" in rest, out + rest
        assert repo_snapshot(repo) == before
        log = (tmp_path / "logs" / f"tritonserver-{port}.log").read_text()
        assert "successfully loaded 'treespec'" in log  # the log outlives the server

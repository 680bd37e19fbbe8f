"""Hostile clients against the real service (tritonserver 2.51 + supervisor + HTTP front, tiny model,
CPU, 127.0.0.1): nothing a client sends stops it (issue 14).

One service for the module. Before the front, a few MB of nested JSON killed tritonserver with
signal 11, and a 90-byte tree config held the only model instance for 13+ minutes. Here: oversize
and deeply nested bodies are refused and the next request is answered correctly by the same
process; the deep tree is refused within a second and the next request runs at its normal speed;
non-JSON and mistyped bodies get 4xx with a message; a request past its deadline is stopped, a stub
stuck past it is killed and replaced; a fuzz of bodies and tree configs (hypothesis, bounded) gets
no 5xx and no hang; and last, a killed tritonserver is restarted by the supervisor and serves again.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from support.triton_helpers import grpc_stream, http_post, hostile_bodies, tree_configs

PROMPT = "What is the capital of France?"
MAX_TOKENS = 8
DEEP_TREE = {"policy": "depth_branching", "depth": 1000000000, "branching": 1, "budget": 8}
SLACK_S = 5.0  # beyond a request's own timeout before it counts as hung


@pytest.fixture(scope="module")
def expected(tiny_artifacts) -> list[int]:
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(tiny_artifacts)
    ids = gen.generate(PROMPT, max_new_tokens=MAX_TOKENS).token_ids
    gen.close()
    return ids


@pytest.fixture(scope="module")
def service(tiny_artifacts, expected, tmp_path_factory):
    from treespec.exporter.triton_repo import write_triton_repo
    from treespec.runtime.triton.service import TritonService

    repo = write_triton_repo(tiny_artifacts, tmp_path_factory.mktemp("triton") / "repo")
    # exit timeout 3 s: Triton 2.51 never releases the request of a killed stub (see test_triton_faults)
    with TritonService(repo, None, None, None, startup_timeout=300, exit_timeout=3, supervise_interval=0.25,
                       grace_s=1.0, backoff_s=0.5, on_event=lambda m: print(f"[supervisor] {m}")) as srv:
        yield srv


def generate(service, body: dict | bytes, path: str = "generate", timeout: float = 60) -> tuple[int, dict, float]:
    t0 = time.perf_counter()
    code, text = http_post(f"{service.http_url}/v2/models/treespec/{path}", body, timeout)
    elapsed = time.perf_counter() - t0
    try:
        out = json.loads(text) if path == "generate" else {"events": text}
    except ValueError:
        out = {"raw": text[:300]}
    return code, out, elapsed


def served_correctly(service, expected) -> float:
    """One normal request: it must give the Python API's output. Returns its time."""
    code, out, elapsed = generate(service, {"text_input": PROMPT, "max_tokens": MAX_TOKENS})
    assert code == 200, out
    assert out["output_ids"] == expected
    return elapsed


def test_a_10_mb_body_is_refused_and_the_same_server_serves_the_next_request(service, expected):
    pid = service.server.pid
    for name, body in [("nested", b"[" * (10 << 20)), ("text", json.dumps({"text_input": "a" * (10 << 20)}).encode())]:
        code, out, elapsed = generate(service, body)
        assert code == 413 and "limit" in out["error"], (name, code, out)
        print(f"\n10 MB {name} body: {code} in {elapsed * 1000:.0f} ms")
    # under the size limit, the nesting that killed tritonserver (signal 11 at 4 MB) is refused too
    code, out, _ = generate(service, b"[" * (512 << 10))
    assert code == 400 and "nested too deeply" in out["error"], out
    t0 = time.perf_counter()  # gRPC has no front: the model refuses 10 MB of text before tokenizing it
    stream = grpc_stream(service.grpc_url, "a" * (10 << 20), max_tokens=MAX_TOKENS, timeout=60)
    assert stream.error and "over the limit" in stream.error and len(stream.error) < 300, stream.error[:300]
    print(f"10 MB text over gRPC: refused in {(time.perf_counter() - t0) * 1000:.0f} ms")
    took = served_correctly(service, expected)
    print(f"next request served correctly in {took * 1000:.0f} ms")
    assert service.server.pid == pid and service.server.restarts == 0


def test_the_deep_tree_is_refused_at_once_and_the_next_request_runs_at_normal_speed(service, expected):
    normal = sorted(served_correctly(service, expected) for _ in range(3))[1]
    for tree in (DEEP_TREE, json.dumps(DEEP_TREE)):
        code, out, refused = generate(service, {"text_input": PROMPT, "max_tokens": MAX_TOKENS, "tree": tree})
        assert code == 400 and "over the cap" in out["error"], out
        assert refused < 1.0
    t0 = time.perf_counter()  # the gRPC door: the model refuses it before any work
    stream = grpc_stream(service.grpc_url, PROMPT, max_tokens=MAX_TOKENS, tree=json.dumps(DEEP_TREE), timeout=30)
    grpc_refused = time.perf_counter() - t0
    assert stream.error and "over the cap" in stream.error and grpc_refused < 1.0, stream.error
    after = served_correctly(service, expected)
    print(f"\ndeep tree refused in {refused * 1000:.1f} ms (HTTP), {grpc_refused * 1000:.1f} ms (gRPC); "
          f"next request {after * 1000:.0f} ms, normal {normal * 1000:.0f} ms")
    assert after < max(3 * normal, normal + 0.5)


BAD_BODIES = [
    (b"not json", "is not JSON"),
    (b"\xff\xfe{", "is not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"text_input": "Hi", "temperature": NaN}', "temperature must be a finite number"),
    ({}, "missing input"),
    ({"text_input": 5}, "text_input must be a string"),
    (b'{"text_input": "\\ud800 lone"}', "lone surrogate"),  # Triton's own parser said 500
    ({"text_input": "Hi", "max_tokens": "eight"}, "max_tokens must be an integer"),
    ({"text_input": "Hi", "max_tokens": 8.5}, "max_tokens must be an integer"),
    ({"text_input": "Hi", "max_tokens": 10 ** 12}, "got 1000000000000"),
    ({"text_input": "Hi", "seed": -1}, "seed must be an integer in [0, 2^63 - 1], got -1"),
    ({"text_input": "Hi", "seed": 2 ** 63}, "seed must be an integer"),
    ({"text_input": "Hi", "stream": "yes"}, "stream must be true or false"),
    ({"text_input": "Hi", "stream": True}, "needs the generate_stream endpoint"),
    ({"text_input": "Hi", "top_k": -2}, "top_k must be an integer"),
    ({"text_input": "Hi", "tree": 42}, "tree must be"),
    ({"text_input": "Hi", "tree": "/etc/passwd"}, "unknown tree '/etc/passwd'"),
    ({"text_input": "Hi", "timeout": 0}, "timeout must be in"),
    ({"text_input": "Hi", "timeout": 1e9}, "timeout must be in"),
    ({"input_ids": "abc"}, "input_ids must be a non-empty list"),
    ({"input_ids": [-1]}, "input_ids must be non-negative"),
    ({"input_ids": [10 ** 9]}, "input_ids must lie in"),
    ({"text_input": "Hi", "colour": "red"}, "unknown field 'colour'"),
    ({"text_input": "x" * 300_000}, "far more than the context limit"),
]


@pytest.mark.parametrize("body,message", BAD_BODIES, ids=[m for _, m in BAD_BODIES])
def test_bad_bodies_get_a_4xx_with_a_message(service, body, message):
    code, out, elapsed = generate(service, body)
    assert code == 400, out
    assert message in out["error"] and "internal error" not in out["error"], out
    assert len(out["error"]) < 300 and elapsed < 2.0


def test_output_ids_is_always_a_list(service, expected):
    code, out, _ = generate(service, {"text_input": PROMPT, "max_tokens": 1})
    assert code == 200 and out["output_ids"] == expected[:1]
    code, out, _ = generate(service, {"text_input": PROMPT, "max_tokens": 3, "stream": True}, "generate_stream")
    events = [json.loads(line[6:]) for line in out["events"].splitlines() if line.startswith("data: ")]
    assert code == 200 and events and all(isinstance(e["output_ids"], list) for e in events)
    assert [t for e in events for t in e["output_ids"]] == expected[:3]


def test_model_control_is_not_reachable_by_clients(service, expected):
    code, _ = http_post(f"{service.http_url}/v2/repository/models/treespec/unload", b"{}", 10)
    assert code == 403
    code, text = http_post(f"{service.server.http_url}/v2/repository/models/treespec/unload", b"{}", 10)
    assert code == 403 and "restricted" in text  # tritonserver's own port wants the supervisor's key
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(service.grpc_url)
    with pytest.raises(Exception, match="restricted"):
        client.unload_model("treespec")
    client.close()
    served_correctly(service, expected)


def test_a_request_past_its_deadline_is_stopped_and_the_next_is_served(service, expected):
    code, out, elapsed = generate(service, {"text_input": PROMPT, "max_tokens": 200, "timeout": 0.05})
    assert code == 408 and "deadline exceeded" in out["error"], out
    print(f"\n0.05 s deadline: 408 after {elapsed * 1000:.0f} ms ({out['error']})")
    assert elapsed < 2.0
    served_correctly(service, expected)


def test_a_stub_stuck_past_its_deadline_is_killed_and_the_model_replaced(service, expected):
    stopped = []

    def freeze_the_stub(progress) -> None:  # stuck inside a step, as a hung kernel would be
        if not stopped:
            pid = service.server.stub_pids()[0]
            os.kill(pid, signal.SIGSTOP)
            stopped.append((pid, time.perf_counter()))

    out = grpc_stream(service.grpc_url, PROMPT, max_tokens=200, timeout=30, on_response=freeze_the_stub,
                      request_timeout=1.0)
    assert stopped and out.error and "hung" not in out.error, out
    grpc_error = out.error
    failed_after = time.perf_counter() - stopped[0][1]
    # Triton itself gives up on the frozen stub ("not healthy") but leaves it there; the supervisor
    # kills it once its request is past the deadline (1 s) plus the grace (1 s), and reloads the model.
    while service.supervisor.kills == 0 and time.perf_counter() - stopped[0][1] < 10:
        time.sleep(0.1)
    assert service.supervisor.kills == 1, service.supervisor.events
    killed_after = time.perf_counter() - stopped[0][1]
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 120:
        code, out, _ = generate(service, {"text_input": PROMPT, "max_tokens": MAX_TOKENS}, timeout=30)
        if code == 200:
            break
        assert code in (503, 408), out  # a clear "retry" meanwhile, never a hang
        time.sleep(0.25)
    assert code == 200 and out["output_ids"] == expected
    assert stopped[0][0] not in service.server.stub_pids()
    print(f"\nstuck stub: the request failed {failed_after:.1f} s after the stub froze ({grpc_error}); killed "
          f"after {killed_after:.1f} s (deadline 1 s); served again {time.perf_counter() - t0:.1f} s later")


def _no_5xx_no_hang(service, body, path: str = "generate") -> None:
    """The request's own deadline (its timeout when valid, else the default) bounds the answer's time."""
    timeout = body.get("timeout") if isinstance(body, dict) else None
    valid = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout <= 120
    allowed = (timeout if valid else 120) + SLACK_S
    code, out, elapsed = generate(service, body, path, timeout=allowed)
    event(f"HTTP {code}")  # --hypothesis-show-statistics: how many were served, how many refused
    assert 200 <= code < 500, (body if not isinstance(body, bytes) else body[:200], code, out)
    assert code == 200 or out.get("error") or path != "generate", out
    assert elapsed < allowed


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=hostile_bodies())
def test_fuzzed_request_bodies_get_no_5xx_and_no_hang(service, body):
    _no_5xx_no_hang(service, body)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(tree=tree_configs(), as_text=st.booleans(), stream=st.booleans())
def test_fuzzed_tree_configs_get_no_5xx_and_no_hang(service, tree, as_text, stream):
    body = {"text_input": PROMPT, "max_tokens": MAX_TOKENS, "timeout": 10,
            "tree": json.dumps(tree) if as_text else tree, "stream": stream}
    _no_5xx_no_hang(service, body, "generate_stream" if stream else "generate")


def test_after_the_fuzz_the_same_server_serves_correctly(service, expected):
    assert service.server.alive() and service.server.restarts == 0
    served_correctly(service, expected)
    assert not any("Traceback" in line for line in service.server.error_lines())


def test_a_killed_tritonserver_is_restarted_and_serves_again(service, expected):
    """The last test on the service: the supervisor restarts the process itself, on the same ports."""
    old = service.server.pid
    os.kill(old, signal.SIGKILL)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 180:
        code, out, _ = generate(service, {"text_input": PROMPT, "max_tokens": MAX_TOKENS}, timeout=30)
        if code == 200:
            break
        assert code == 503, out  # "restarting, retry": never a hang, never a dropped port
        time.sleep(0.25)
    back = time.perf_counter() - t0
    assert code == 200 and out["output_ids"] == expected
    assert service.server.restarts == 1 and service.server.pid != old
    assert any("tritonserver died (killed by signal 9 (SIGKILL))" in e for e in service.supervisor.events)
    print(f"\ntritonserver SIGKILLed: serving again {back:.1f} s later ({service.supervisor.events[-1]})")


def test_serve_refuses_a_bad_size_limit_in_one_line(tiny_artifacts, tmp_path):
    done = subprocess.run([sys.executable, "-m", "treespec.runtime.cli", "serve", "--artifacts", str(tiny_artifacts),
                           "--repo", str(tmp_path / "repo"), "--max-request-bytes", "10"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == ["error: --max-request-bytes must be at least 1024, got 10"]
    assert not (tmp_path / "repo").exists()  # refused before anything was written or loaded

"""Faults on the real Triton server (SmolLM2, CPU): a killed python-backend stub, SIGTERM mid-stream.

What Triton 2.51 does when the stub of a *decoupled* python model dies: the in-flight request
gets the error "Stub process 'treespec_0_0' is not healthy." at once (no hang), and so does every
later request -- Triton restarts dead stubs of non-decoupled models only, and the model stays
"ready". The service's supervisor (runtime/triton/supervisor.py) notices the dead stub and reloads the
model (a load with a config override: a new stub, swapped in when ready); until then requests get
that same error at once (never a hang); afterwards they succeed.

One more 2.51 behaviour: the request that was in flight when the stub died is never released, so
the old model version stays "live"; a later SIGTERM then waits the whole --exit-timeout-secs for
it and the server exits with code 1 ("Exit timeout expired"). The first test checks that too.

On SIGTERM (no crash before) Triton stops taking new requests, lets the model finish the requests
it has (up to --exit-timeout-secs, 30 s by default), unloads it and exits with code 0.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from support.triton_helpers import MAX_TOKENS, PROMPTS, TIMEOUT, grpc_stream

pytestmark = pytest.mark.slow
LONG = 64  # tokens: long enough to be stopped mid-stream


@pytest.fixture(scope="module")
def expected(smollm2_artifacts):
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(smollm2_artifacts)
    out = {p: gen.generate(p, max_new_tokens=MAX_TOKENS).token_ids for p in PROMPTS[:3]}
    gen.close()
    return out


@pytest.fixture(scope="module")
def repo(smollm2_artifacts, tmp_path_factory):
    from treespec.exporter.triton_repo import write_triton_repo

    return write_triton_repo(smollm2_artifacts, tmp_path_factory.mktemp("triton") / "repo")


@pytest.fixture
def supervised(repo, expected, request):
    from treespec.runtime.triton.service import TritonService

    exit_timeout = getattr(request, "param", 30)
    with TritonService(repo, None, None, None, startup_timeout=600, supervise_interval=0.5,
                       exit_timeout=exit_timeout) as service:
        yield service.server, service.supervisor


@pytest.fixture
def server(supervised):
    return supervised[0]


@pytest.mark.parametrize("supervised", [3], indirect=True)  # exit timeout: see the last step
def test_killed_stub_mid_stream_gives_an_error_then_the_model_comes_back(supervised, server, expected):
    killed = []

    def kill_after_two(progress) -> None:
        if progress.responses == 2 and not killed:
            pids = server.stub_pids()
            assert len(pids) == 1
            os.kill(pids[0], signal.SIGKILL)
            killed.append((pids[0], time.perf_counter()))

    out = grpc_stream(server.grpc_url, PROMPTS[0], max_tokens=LONG, timeout=30, on_response=kill_after_two)
    assert killed, "the stream ended before the stub could be killed"
    assert out.error is not None and not out.final, out
    assert "hung" not in out.error, out.error
    assert "not healthy" in out.error or "Socket closed" in out.error or "unknown model" in out.error, out.error
    print(f"\nclient error {time.perf_counter() - killed[0][1]:.2f} s after the kill: {out.error}")

    # Until the supervisor's reload finishes, requests fail fast with a clear error; then they succeed.
    t0 = time.perf_counter()
    errors = []
    while time.perf_counter() - t0 < 300:
        out = grpc_stream(server.grpc_url, PROMPTS[1], timeout=TIMEOUT)
        if out.ok:
            break
        assert "hung" not in out.error
        errors.append(out.error)
        time.sleep(1)
    assert out.ok, errors[-3:]
    assert out.ids == expected[PROMPTS[1]]
    assert server.reloads == 1 and killed[0][0] not in server.stub_pids()
    supervisor = supervised[1]
    assert any("died; reloading" in e for e in supervisor.events), supervisor.events
    print(f"model back {time.perf_counter() - t0:.1f} s after the failed stream "
          f"({len(errors)} requests refused meanwhile: {sorted(set(errors))})")

    # Triton 2.51 never releases the request that was in flight when the stub died: SIGTERM waits
    # the whole exit timeout for it, then exits 1. (If this starts failing, Triton fixed it.)
    supervisor.stop()  # this SIGTERM is ours: no restart
    t0 = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(server.exit_timeout + 60)
    assert code == 1 and "Exit timeout expired" in server.log_text()
    assert time.perf_counter() - t0 >= server.exit_timeout - 1


def test_sigterm_with_requests_in_flight_stops_cleanly(supervised, server, expected):
    results = {}
    streaming = threading.Event()

    def client(i: int) -> None:
        results[i] = grpc_stream(server.grpc_url, PROMPTS[i], timeout=60, on_response=lambda _: streaming.set())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    assert streaming.wait(60), "no stream started"
    supervised[1].stop()  # this SIGTERM is ours: no restart
    t0 = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(server.exit_timeout + 60)
    stop_s = time.perf_counter() - t0
    for t in threads:
        t.join(TIMEOUT)
    assert code == 0, server.log_tail()
    assert not server.stub_pids()
    assert "Waiting for in-flight requests to complete" in server.log_text()
    assert all(not t.is_alive() for t in threads) and len(results) == 3
    for i, out in results.items():  # every stream finished, or failed cleanly: none hangs
        assert out.ok or (out.error and "hung" not in out.error), out
        if out.ok:
            assert out.ids == expected[PROMPTS[i]]
    print(f"\nSIGTERM: server exited {stop_s:.1f} s later with code 0; "
          f"{sum(o.ok for o in results.values())} of 3 in-flight streams completed")
    print("\n".join(server.error_lines()))


def test_a_model_that_cannot_load_fails_the_start_with_its_message(tiny_artifacts, tmp_path):
    """A bad default tree in the repository: start() raises at once with the model's own message and
    the log tail, instead of waiting for a readiness that never comes."""
    from treespec.exporter.triton_repo import write_triton_repo
    from treespec.runtime.triton.server import ServerError, TritonServer

    repo = write_triton_repo(tiny_artifacts, tmp_path / "repo", tree="no-such-tree")
    server = TritonServer(repo, None, None, None, startup_timeout=300)
    t0 = time.perf_counter()
    with pytest.raises(ServerError) as err:
        server.start()
    assert "unknown tree 'no-such-tree'" in str(err.value), str(err.value)[-3000:]
    assert time.perf_counter() - t0 < 120
    assert server.proc.poll() is not None and str(server.log_file) in str(err.value)
    assert "no-such-tree" in server.log_text()  # the log stays for a look; the rest is gone
    server.cleanup()
    assert not server.log_file.exists()

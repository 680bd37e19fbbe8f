"""Load on the real Triton server (marked `load`; `-m load` runs it alone).

16 concurrent gRPC streaming clients on loopback against the SmolLM2 repository (ONNX Runtime CPU
backend, small max_tokens) for TREESPEC_LOAD_SECONDS (default 120; CI's bound; the issue's 5
minutes: TREESPEC_LOAD_SECONDS=300): zero failed requests, every
greedy output equal to the Python API's, no errors in the server log, and the server's memory
(RSS of tritonserver + its python stubs) at the end within 10% of what it was after warm-up.
Prints requests/s, tokens/s and p50/p99 latency (whole request and first response).
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from support.triton_helpers import PROMPTS, grpc_stream, rss_kb

pytestmark = pytest.mark.load
CLIENTS = 16
MAX_TOKENS = 8
REQUEST_TIMEOUT = 300.0  # 16 clients queue behind one model instance: waits of a minute are normal here
POOL = PROMPTS + [
    "Name a fruit that is yellow.",
    "Translate 'good morning' into French.",
    "What is 12 times 12?",
    "Give one tip for writing clean code, and explain briefly why it helps maintainability.",
]


def _server_rss_kb(server) -> int:
    return sum(rss_kb(pid) for pid in [server.pid, *server.stub_pids()])


@pytest.fixture(scope="module")
def expected(smollm2_artifacts):
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(smollm2_artifacts)
    out = {p: gen.generate(p, max_new_tokens=MAX_TOKENS).token_ids for p in POOL}
    gen.close()
    return out


@pytest.fixture(scope="module")
def server(smollm2_artifacts, expected, tmp_path_factory):
    from treespec.exporter.triton_repo import write_triton_repo
    from treespec.runtime.triton.server import TritonServer

    repo = write_triton_repo(smollm2_artifacts, tmp_path_factory.mktemp("triton") / "repo")
    with TritonServer(repo, None, None, None, startup_timeout=600) as srv:
        print(f"\ntritonserver ready in {srv.startup_s:.1f} s")
        yield srv


def _run_clients(server, expected, deadline: float | None, rounds: int | None) -> list[tuple]:
    """Each client loops over the prompt pool until the deadline (or for `rounds` requests)."""
    records: list[tuple] = []  # (client, prompt, StreamResult, correct)
    lock = threading.Lock()

    def client(c: int) -> None:
        k = 0
        while (rounds is None or k < rounds) and (deadline is None or time.monotonic() < deadline):
            prompt = POOL[(c + k) % len(POOL)]
            out = grpc_stream(server.grpc_url, prompt, max_tokens=MAX_TOKENS, timeout=REQUEST_TIMEOUT)
            with lock:
                records.append((c, prompt, out, out.ok and out.ids == expected[prompt]))
            k += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    budget = (deadline - time.monotonic() if deadline else 0) + REQUEST_TIMEOUT * (rounds or 1) * 2
    for t in threads:
        t.join(max(budget, 1))
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    return records


def test_sixteen_streaming_clients_under_load(server, expected):
    seconds = float(os.environ.get("TREESPEC_LOAD_SECONDS", "120"))
    warm = _run_clients(server, expected, None, rounds=1)  # every client once: all prompts seen
    assert all(ok for *_, ok in warm), [(p, o.error) for _, p, o, ok in warm if not ok]
    rss_warm = _server_rss_kb(server)

    t0 = time.monotonic()
    records = _run_clients(server, expected, t0 + seconds, rounds=None)
    elapsed = time.monotonic() - t0
    rss_end = _server_rss_kb(server)

    failed = [(c, p, o.error) for c, p, o, _ in records if not o.ok]
    wrong = [(c, p, o.ids, expected[p]) for c, p, o, ok in records if o.ok and not ok]
    latency = np.array([o.total_s for _, _, o, _ in records])
    first = np.array([o.first_s for _, _, o, _ in records if o.first_s is not None])
    tokens = sum(len(o.ids) for _, _, o, _ in records)
    print(f"\nload: {len(records)} requests from {CLIENTS} streaming clients in {elapsed:.0f} s: "
          f"{len(records) / elapsed:.2f} requests/s, {tokens / elapsed:.1f} tokens/s; latency p50 "
          f"{np.percentile(latency, 50):.2f} s, p99 {np.percentile(latency, 99):.2f} s; first response p50 "
          f"{np.percentile(first, 50):.2f} s, p99 {np.percentile(first, 99):.2f} s; server RSS "
          f"{rss_warm / 1024:.0f} MiB after warm-up, {rss_end / 1024:.0f} MiB at the end "
          f"({100 * (rss_end - rss_warm) / rss_warm:+.1f}%); failures {len(failed)}, wrong outputs {len(wrong)}")
    assert not failed, failed[:5]
    assert not wrong, wrong[:5]
    assert len(records) >= CLIENTS
    assert server.error_lines() == []
    assert abs(rss_end - rss_warm) <= 0.10 * rss_warm, (rss_warm, rss_end)

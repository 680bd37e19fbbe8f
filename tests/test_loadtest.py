"""`treespec loadtest` against the real tritonserver (CPU, tiny model, in-flight batching over 4 slots).

Two levels (1 and 3 streams), speculative (the server's default tree) and plain (`tree: none`)
through the same server: every output equals the same request sent alone, the JSON and PNG hold
each level's numbers, and the metrics endpoint shows the load-aware tree sizing (budget, batch
width, tokens per step) and where the engine's time goes per step. Bad input (no server, bad
levels) is one line and exit 2.
"""
from __future__ import annotations

import json

import pytest

from support.triton_helpers import metrics
from treespec.runtime.cli import main

SLOTS = 4


@pytest.fixture(scope="module")
def service(tiny_artifacts, tmp_path_factory):
    from treespec.exporter.triton_repo import write_triton_repo
    from treespec.runtime.triton.service import TritonService

    repo = write_triton_repo(tiny_artifacts, tmp_path_factory.mktemp("triton") / "repo", batch_slots=SLOTS)
    with TritonService(repo, None, None, None, startup_timeout=300, exit_timeout=3) as srv:
        yield srv


def test_loadtest_compares_speculative_and_plain_through_one_server_losslessly(service, tmp_path, capsys):
    out = tmp_path / "load"
    metrics_port = service.server.metrics_port
    code = main(["loadtest", "--url", service.http_url, "--metrics-url", f"http://127.0.0.1:{metrics_port}/metrics",
                 "--levels", "1,3", "--requests", "3", "--max-tokens", "12", "--num-prompts", "3",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    print(printed)
    assert code == 0, printed
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["mode"], r["clients"]): r for r in result["results"]}
    assert set(rows) == {("default", 1), ("default", 3), ("none", 1), ("none", 3)}
    for row in rows.values():
        assert row["requests"] == 3 and row["errors"] == 0 and row["mismatches"] == 0
        assert row["tokens"] > 0 and row["total_tokens_per_s"] > 0 and row["ttft_s_p50"] > 0
        assert row["latency_s_p99"] >= row["latency_s_p50"] > 0
        assert all(s["matches"] for s in row["samples"])  # warm-up requests included
    # the same prompts give the same tokens with and without speculation (greedy: lossless)
    assert result["reference"]["default"]["ids"] == result["reference"]["none"]["ids"]
    assert {r["mode"] for r in result["x_vs_plain"]} == {"default"}
    assert out.with_suffix(".png").stat().st_size > 10_000
    # the metrics endpoint shows the load-aware sizing: the chosen budget, the width, the acceptance
    gauges = {k.split("{")[0]: v for k, v in metrics(service).items()}
    assert {"treespec_tree_budget", "treespec_batch_width", "treespec_tokens_per_step"} <= set(gauges)
    assert gauges["treespec_tokens_per_step"] >= 1.0 and 1 <= gauges["treespec_batch_width"] <= SLOTS
    # and where the engine's time goes: every level's steps split into its phases
    for row in rows.values():
        split = row["server_ms_per_step"]
        assert set(split) == {"admit", "draft", "target", "host"} and split["target"] > 0, split
    # speculation shows: the speculative level drafted more than the plain one, unless no tree paid at
    # its width even with the best acceptance seen (the tiny random drafter accepts next to nothing)
    # and its requests were decoded plainly, which the metrics count
    assert "treespec_requests_plain_under_load" in gauges
    assert rows[("none", 1)]["plain_under_load"] == rows[("none", 3)]["plain_under_load"] == 0  # tree none: not counted
    assert (rows[("default", 1)]["server_ms_per_step"]["draft"] > rows[("none", 1)]["server_ms_per_step"]["draft"]
            or rows[("default", 1)]["plain_under_load"] + rows[("default", 3)]["plain_under_load"] > 0)


def test_loadtest_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from treespec.runtime.triton.server import free_port

    assert main(["loadtest", "--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no treespec server reachable at") and "\n" not in err
    for argv, message in ((["--levels", "0,8"], "--levels must be integers in"),
                          (["--levels", "one"], "--levels must be comma-separated integers"),
                          (["--requests", "0"], "--requests must be at least 1"),
                          (["--url", "ftp://x"], "--url must be an http://host:port URL")):
        assert main(["loadtest", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())

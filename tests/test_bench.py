"""`treespec bench` on the tiny artifacts (CPU): valid JSON and a PNG."""
from __future__ import annotations

import json
import subprocess
import sys


def test_bench_cpu(tiny_artifacts, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "treespec.runtime.cli", "bench", "--artifacts", str(tiny_artifacts),
           "--num-prompts", "2", "--max-new-tokens", "16", "--device", "cpu", "--backends", "torch,onnxruntime",
           "--drafters", "lookup", "--baselines", "ar,hf", "--curve-reps", "2",
           "--json", str(out), "--plot", str(png)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    data = json.loads(out.read_text())
    names = [c["name"] for c in data["configs"]]
    assert "torch --tree none" in names and any("lookup" in n for n in names)
    assert all(c["lossless"] for c in data["configs"])
    assert data["baselines"] and data["baselines"][0]["name"] == "hf greedy"
    assert data["verify_curve_ms"]["torch"] and data["verify_curve_ms"]["onnxruntime"]
    assert "onnxruntime --tree none" in names
    assert png.stat().st_size > 10_000
    assert data["prompt_categories"] == ["qa", "qa"]  # the first two bench prompts
    best = next(c for c in data["configs"] if c["name"] == data["summary"]["best_mean_accepted_any"]["name"])
    assert data["summary"]["best_mean_accepted_by_category"] == {
        "qa": round(sum(best["mean_accepted_all"]) / 2, 3)}

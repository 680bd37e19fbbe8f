"""The report of `treespec loadtest`: per-level statistics, the server's own counters, JSON and PNG."""
from __future__ import annotations

import json
import threading
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np

from treespec.files import write_json as write_json_file

# Gauges of the server's load-aware tree sizing (runtime/triton/model.py), shown per level as read after it
SIZING_GAUGES = ("treespec_tree_budget", "treespec_batch_width", "treespec_batch_running", "treespec_tokens_per_step")


def server_metrics(url: str) -> dict[str, float]:
    """treespec_* samples of Triton's metrics endpoint, summed over label sets; {} when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            lines = r.read().decode().splitlines()
    except OSError:
        return {}
    out: dict[str, float] = defaultdict(float)
    for line in lines:
        if line.startswith("treespec_"):
            key, value = line.rsplit(" ", 1)
            name = key.split("{", 1)[0]
            if name in SIZING_GAUGES:  # per instance: the largest
                out[name] = max(out.get(name, float(value)), float(value))
            else:
                out[name] += float(value)
    return dict(out)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def level_summary(clients: int, mode: str, samples: list, before: dict, after: dict) -> dict:
    """One level's numbers over its counted requests (errors and mismatches over all of them)."""
    counted = [s for s in samples if s.counted]
    ok = [s for s in counted if s.error is None]
    tokens = sum(len(s.ids) for s in ok)
    window = (max(s.start + s.latency_s for s in counted) - min(s.start for s in counted)) if counted else 0.0
    per_request = [len(s.ids) / s.latency_s for s in ok if s.latency_s > 0]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    latency = [s.latency_s for s in ok]
    out = {
        "mode": mode, "clients": clients, "requests": len(counted), "warmup_requests": len(samples) - len(counted),
        "tokens": tokens, "window_s": round(window, 4),
        "total_tokens_per_s": round(tokens / window, 2) if window > 0 else 0.0,
        "per_request_tokens_per_s_p50": _pct(per_request, 50),
        "per_request_tokens_per_s_mean": round(float(np.mean(per_request)), 2) if per_request else None,
        "ttft_s_p50": _pct(ttft, 50), "ttft_s_p99": _pct(ttft, 99),
        "latency_s_p50": _pct(latency, 50), "latency_s_p99": _pct(latency, 99),
        "errors": sum(s.error is not None for s in samples),
        "mismatches": sum(s.error is None and s.matches is False for s in samples),
        "first_error": next((s.error for s in samples if s.error), None),
    }
    steps = after.get("treespec_steps_total", 0) - before.get("treespec_steps_total", 0)
    made = after.get("treespec_tokens_total", 0) - before.get("treespec_tokens_total", 0)
    if steps > 0:
        out["server_tokens_per_step"] = round(made / steps, 3)  # per sequence and verification step
        phases = {name[len("treespec_engine_"):-len("_seconds_total")]: after[name] - before.get(name, 0.0)
                  for name in after if name.startswith("treespec_engine_") and name.endswith("_seconds_total")}
        # Where the engine's time went per verification step of one sequence (admissions spread over
        # them): with W sequences running, one engine step takes about W times these.
        if phases:
            out["server_ms_per_step"] = {k: round(v / steps * 1e3, 3) for k, v in sorted(phases.items())}
    plain = "treespec_requests_plain_under_load"
    if plain in after:  # greedy requests of this level (warm-up included) the load made plain
        out["plain_under_load"] = int(after[plain] - before.get(plain, 0))
    return out


class GaugeSampler:
    """The server's sizing gauges, read every `every_s` while a level runs (a context manager)."""

    def __init__(self, url: str, every_s: float = 0.5):
        self.url, self.every_s = url, every_s
        self.samples: list[dict[str, float]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GaugeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._done.wait(self.every_s):
            values = server_metrics(self.url)
            if "treespec_tree_budget" in values:
                self.samples.append({k: values[k] for k in SIZING_GAUGES if k in values})

    def summary(self) -> dict:
        busy = [s for s in self.samples if s.get("treespec_batch_running", 0) > 0]
        if not busy:
            return {}
        budgets = [s["treespec_tree_budget"] for s in busy]
        rates = [s["treespec_tokens_per_step"] for s in busy if "treespec_tokens_per_step" in s]
        return {"budget_p50": float(np.median(budgets)), "budget_min": min(budgets), "budget_max": max(budgets),
                "width_max": max(s.get("treespec_batch_width", 0) for s in busy),
                "running_max": max(s["treespec_batch_running"] for s in busy),
                "tokens_per_step_gauge": round(float(np.median(rates)), 3) if rates else None}


def print_level(s: dict) -> None:
    extra = ""
    if "budget_p50" in s:
        extra = f" budget p50 {s['budget_p50']:.0f} (range {s['budget_min']:.0f}-{s['budget_max']:.0f}), width {s['width_max']:.0f}"
    acc = f" acc/step {s['server_tokens_per_step']:.2f}" if "server_tokens_per_step" in s else ""
    if s.get("plain_under_load"):
        extra += f", {s['plain_under_load']} plain under load"
    if "server_ms_per_step" in s:
        acc += " ms/step " + " ".join(f"{k} {v:.2f}" for k, v in s["server_ms_per_step"].items())
    print(f"[{s['mode']}] {s['clients']:3d} streams: {s['total_tokens_per_s']:9.1f} tok/s total, "
          f"{s['per_request_tokens_per_s_p50'] or 0:7.1f} tok/s per request (p50), ttft p50 "
          f"{(s['ttft_s_p50'] or 0) * 1e3:7.1f} ms, latency p50/p99 {s['latency_s_p50'] or 0:6.2f}/"
          f"{s['latency_s_p99'] or 0:6.2f} s, {s['requests']} requests, {s['errors']} errors, "
          f"{s['mismatches']} mismatches{acc}{extra}", flush=True)


def ratios(result: dict) -> list[dict]:
    """Total tokens/s of each non-plain mode over plain ("none") at every level."""
    by = {(r["mode"], r["clients"]): r["total_tokens_per_s"] for r in result["results"]}
    out = []
    for (mode, clients), value in sorted(by.items()):
        plain = by.get(("none", clients))
        if mode != "none" and plain:
            out.append({"mode": mode, "clients": clients, "x_vs_plain": round(value / plain, 3)})
    return out


def write_json(prefix: Path, result: dict) -> Path:
    result["x_vs_plain"] = ratios(result)
    path = Path(f"{prefix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_file(path, result)
    return path


def plot(result: dict, prefix: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("total_tokens_per_s", "total tokens/s"), ("per_request_tokens_per_s_p50", "per-request tokens/s (p50)"),
              ("ttft_s_p50", "time to first token p50 (s)"), ("latency_s_p99", "latency p99 (s)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (key, title) in zip(axes, panels):
        for mode in result["modes"]:
            rows = sorted((r["clients"], r[key]) for r in result["results"] if r["mode"] == mode and r[key] is not None)
            label = "plain (tree none)" if mode == "none" else f"speculative ({mode})"
            ax.plot([c for c, _ in rows], [v for _, v in rows], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"treespec loadtest: {result['num_prompts']} prompts, {result['max_tokens']} tokens each")
    fig.tight_layout()
    path = Path(f"{prefix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

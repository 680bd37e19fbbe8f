"""`--tree auto`: pick the node budget that maximises expected accepted tokens per second.

Hardware awareness (Sequoia / OPT-Tree): the time of one target pass grows with the number of tree
tokens T, slowly while the device is latency bound and then steeply. That curve is measured once
per artifact directory + backend + device (+ thread count and host) and cached as JSON: in the
artifact directory (`latency_curves.json`), or in the user cache dir
($XDG_CACHE_HOME/treespec or ~/.cache/treespec) when the artifact directory is not writable.

Per step the drafter grows an OPT-Tree to the configured maximum budget; the nodes sorted by
estimated acceptance probability v_1 >= v_2 >= ... (product of drafter probabilities along the
path) give E(n) = 1 + v_1 + ... + v_n expected tokens for the best n-node tree, and the step keeps
the n maximising E(n) / (draft time + verify latency(n + 1)). With a batch the budget n is shared
(one target pass verifies every tree): the sum over sequences of E_b(n) is maximised.

Drafter probabilities are rarely calibrated (the lookup drafter's count ratios are far too
confident), so the planner also tracks, over recent steps, how many drafted tokens were actually
accepted against how many the path probabilities predicted, and scales the prediction by that
ratio: E(n) = 1 + c * (v_1 + ... + v_n).
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from treespec.files import read_json_or_empty, write_json
from treespec.runtime.backends.base import StepInputs, TreeBackend

CURVE_FILE = "latency_curves.json"
SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
FORMAT = 1


@dataclass
class LatencyCurve:
    """Seconds of one target pass (batch 1) against tree tokens T, non-decreasing in T."""

    sizes: list[int]
    seconds: list[float]

    def __post_init__(self) -> None:
        order = np.argsort(self.sizes)
        self.sizes = [int(self.sizes[i]) for i in order]
        self.seconds = [float(s) for s in np.maximum.accumulate([self.seconds[i] for i in order])]

    def __call__(self, tokens: int) -> float:
        if tokens > self.sizes[-1] and len(self.sizes) > 1:  # extrapolate the last segment
            (a, b), (ta, tb) = self.sizes[-2:], self.seconds[-2:]
            return tb + (tb - ta) / (b - a) * (tokens - b)
        return float(np.interp(tokens, self.sizes, self.seconds))

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def as_dict(self) -> dict:
        return {"sizes": self.sizes, "seconds": [round(s, 7) for s in self.seconds]}


def measure_latency(backend: TreeBackend, max_size: int, past: int = 64, reps: int = 3) -> LatencyCurve:
    """Time one target pass for tree sizes 1 .. max_size against `past` cached tokens (batch 1).
    Resets the backend's cache (call it before a generation, never during one)."""
    sizes = sorted({s for s in SIZES if s < max_size} | {max_size})
    backend.reset(1, past + max_size + 1)
    ids = np.zeros((1, past), np.int64)
    pos = np.arange(past, dtype=np.int64)[None]
    mask = np.tril(np.ones((past, past), np.bool_))[None]
    out = backend.step(StepInputs(ids, pos, mask))
    backend.commit(out, [list(range(past))])
    seconds = []
    for size in sizes:
        inputs = StepInputs(np.zeros((1, size), np.int64), past + np.arange(size, dtype=np.int64)[None],
                            np.tril(np.ones((size, size), np.bool_))[None])
        backend.step(inputs)  # warm-up (allocations, kernel selection)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            backend.step(inputs)
            times.append(time.perf_counter() - t)
        seconds.append(float(np.median(times)))
    return LatencyCurve(sizes, seconds)


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "treespec"


class LatencyCache:
    """Curves for one artifact directory, keyed by backend, device, threads and host."""

    def __init__(self, artifact_dir: str | Path, backend: str, device: str, threads: int | None = None):
        self.root = Path(artifact_dir)
        self.key = (f"{backend}/{device}/threads={threads or 'default'}/"
                    f"{platform.node()}:{os.cpu_count()}cpu")
        digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:16]
        self.paths = [self.root / CURVE_FILE, user_cache_dir() / f"latency-{digest}.json"]
        self.used_path: Path | None = None

    def _fingerprint(self) -> str:
        """Changes when the artifacts are re-exported (the manifest is rewritten)."""
        try:
            st = (self.root / "manifest.json").stat()
            return f"{st.st_size}-{st.st_mtime_ns}"
        except OSError:
            return "none"

    def get(self, max_size: int) -> LatencyCurve | None:
        for path in self.paths:
            entry = read_json_or_empty(path).get("curves", {}).get(self.key)
            if (isinstance(entry, dict) and entry.get("fingerprint") == self._fingerprint()
                    and entry.get("format") == FORMAT):
                try:
                    curve = LatencyCurve(list(entry["sizes"]), list(entry["seconds"]))
                except (KeyError, TypeError, ValueError):
                    continue
                if curve.max_size >= max_size:
                    self.used_path = path
                    return curve
        return None

    def put(self, curve: LatencyCurve) -> Path | None:
        """Write the curve to the first writable location; None if neither is."""
        entry = {**curve.as_dict(), "format": FORMAT, "fingerprint": self._fingerprint(),
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for path in self.paths:
            data = read_json_or_empty(path)
            data.setdefault("curves", {})[self.key] = entry
            data["note"] = ("treespec --tree auto: seconds of one target pass vs tree tokens, "
                            "per backend/device/threads/host; delete to re-measure")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, data)
            except OSError:
                continue
            self.used_path = path
            return path
        return None



class AutoPlanner:
    """Chooses the `auto` policy's node budget per step from the latency curve."""

    def __init__(self, curve: LatencyCurve, max_budget: int):
        self.curve = curve
        self.max_budget = max_budget
        self.next_budget: int | None = None  # sampling mode: learnt from the previous step
        self.history: list[int] = []
        self.predicted = 0.0  # decayed sums: drafted tokens the values predicted / were accepted
        self.observed = 0.0

    DECAY = 0.9
    PRIOR = 0.5  # pseudo-count: start from trusting the drafter

    @property
    def calibration(self) -> float:
        """Accepted drafted tokens per predicted one (recent steps), in [0.02, 1.5]."""
        return float(np.clip((self.observed + self.PRIOR) / (self.predicted + self.PRIOR), 0.02, 1.5))

    def record(self, predicted: float, accepted: int) -> None:
        """After verification: the tree's predicted drafted tokens sum(exp(v)) and how many
        drafted tokens the target accepted."""
        self.predicted = self.DECAY * self.predicted + predicted
        self.observed = self.DECAY * self.observed + accepted

    def choose(self, values_per_seq: list[list[float]], draft_s: float) -> int:
        """The shared budget n maximising sum_b E_b(n) / (draft_s + latency(n + 1))."""
        c = self.calibration
        probs = [c * np.sort(np.exp(np.asarray(v, dtype=np.float64)))[::-1] for v in values_per_seq]
        longest = max((len(p) for p in probs), default=0)
        gain = np.zeros(longest + 1)
        for p in probs:
            cum = np.concatenate([[0.0], np.cumsum(p)])
            gain += 1.0 + np.concatenate([cum, np.full(longest + 1 - len(cum), cum[-1])])
        n = np.arange(longest + 1)
        cost = draft_s + np.array([self.curve(int(k) + 1) for k in n])
        best = int(np.argmax(gain / np.maximum(cost, 1e-9)))
        self.history.append(best)
        return best

    def budget_for_sampling(self, max_budget: int) -> int:
        return min(self.next_budget or max_budget, max_budget)

    def observe(self, values_per_seq: list[list[float]], draft_s: float) -> None:
        """Sampled trees cannot be cut after drawing: set the next step's budget instead (and
        let it grow again when the whole tree was worth verifying)."""
        used = max((len(v) for v in values_per_seq), default=0)
        best = self.choose(values_per_seq, draft_s)
        self.next_budget = max(1, min(self.max_budget, 2 * used if best >= used else best))


def expected_tokens_per_second(values: list[float], draft_s: float, curve: LatencyCurve) -> float:
    """E(tree) / (draft + verify) for one tree given its nodes' log values."""
    return (1.0 + sum(math.exp(v) for v in values)) / (draft_s + curve(len(values) + 1))

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
    return time_steps(backend, 1, past, sizes, reps)


def time_steps(backend: TreeBackend, width: int, past: int, sizes: list[int], reps: int) -> LatencyCurve:
    """Median seconds of one target step [width, T] for each T in sizes, after a prefill of `past`
    tokens per sequence into the (freshly reset) backend."""
    out = backend.step(_chain_inputs(width, 0, past))
    backend.commit(out, [list(range(past))] * width)
    seconds = []
    for size in sizes:
        inputs = _chain_inputs(width, past, size)
        backend.step(inputs)  # warm-up: allocations, kernel choice, CUDA graph capture
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            backend.step(inputs)
            times.append(time.perf_counter() - t)
        seconds.append(float(np.median(times)))
    return LatencyCurve(list(sizes), seconds)


def _chain_inputs(width: int, start: int, n: int) -> StepInputs:
    """n causal tokens (ids 0) at positions start.. for each of `width` sequences."""
    return StepInputs(np.zeros((width, n), np.int64),
                      np.broadcast_to(start + np.arange(n, dtype=np.int64), (width, n)).copy(),
                      np.broadcast_to(np.tril(np.ones((n, n), np.bool_)), (width, n, n)).copy())


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
    """Chooses the `auto` policy's node budget per step from the latency curve.

    With `plan: after` (the default) the tree is drafted to the configured budget and cut to the
    best size. With `plan: ahead` the budget and depth are chosen BEFORE drafting (`plan`), from
    the previous drafted tree's calibrated values, the measured cost of a drafted level and the
    verify time this machine really takes with a drafter beside the target (the curve is measured
    alone, so it is scaled by what the steps took); a plan of 0 nodes is a plain step, with a
    cheap probe now and then (further apart each time it fails) to notice when drafting pays."""

    def __init__(self, curve: LatencyCurve, max_budget: int, max_levels: int = 8):
        self.curve = curve
        self.max_budget = max_budget
        self.max_levels = max(1, max_levels)
        self.next_budget: int | None = None  # sampling mode: learnt from the previous step
        self.history: list[int] = []
        self.predicted = 0.0  # decayed sums: drafted tokens the values predicted / were accepted
        self.observed = 0.0
        self.costs = StepCosts(curve)
        self.shape = StepShape(max_budget, min(2, self.max_levels))  # plan-ahead: the next step's
        self.plain_steps = 0  # consecutive planned plain steps
        self.probe_gap = 1  # plain steps before the next probe (doubles while probes fail)

    DECAY = 0.9
    PRIOR = 0.5  # pseudo-count: start from trusting the drafter
    MAX_PROBE_GAP = 256  # a failed probe (a drafted level, a bigger verify) costs ~1.5 plain steps on 2 CPU cores

    def fits(self, curve: LatencyCurve, max_budget: int, max_levels: int) -> bool:
        """Whether this planner (and what it learnt) can serve a generation with these settings."""
        return (self.curve is curve and self.max_budget == max_budget
                and self.max_levels == max(1, max_levels))

    def begin(self) -> None:
        """A new generation: the time since the last step is not a step's time."""
        self.costs.forget_step()

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
        gain = self._gain(values_per_seq)
        n = np.arange(len(gain))
        cost = draft_s + np.array([self.costs.verify_s(int(k) + 1) for k in n])
        best = int(np.argmax(gain / np.maximum(cost, 1e-9)))
        self.history.append(best)
        return best

    def _gain(self, values_per_seq: list[list[float]]) -> np.ndarray:
        """sum_b E_b(n) for n = 0 .. the most nodes drafted, values calibrated, best first."""
        c = self.calibration
        probs = [c * np.sort(np.exp(np.asarray(v, dtype=np.float64)))[::-1] for v in values_per_seq]
        longest = max((len(p) for p in probs), default=0)
        gain = np.zeros(longest + 1)
        for p in probs:
            cum = np.concatenate([[0.0], np.cumsum(p)])
            gain += 1.0 + np.concatenate([cum, np.full(longest + 1 - len(cum), cum[-1])])
        return gain

    def budget_for_sampling(self, max_budget: int) -> int:
        return min(self.next_budget or max_budget, max_budget)

    def observe(self, values_per_seq: list[list[float]], draft_s: float) -> None:
        """Sampled trees cannot be cut after drawing: set the next step's budget instead (and
        let it grow again when the whole tree was worth verifying)."""
        used = max((len(v) for v in values_per_seq), default=0)
        best = self.choose(values_per_seq, draft_s)
        self.next_budget = max(1, min(self.max_budget, 2 * used if best >= used else best))

    # -- plan ahead: the budget chosen before drafting ----------------------------------------------
    def plan(self) -> StepShape:
        """This step's shape, chosen before drafting: StepShape(0, 0) is a plain step."""
        self.costs.start_step()
        if self.costs.drafting_is_free(self.max_levels):  # draft all, cut after (nothing to save)
            return StepShape(self.max_budget, self.max_levels)
        if self.shape.budget > 0:
            return self.shape
        if self.plain_steps < self.probe_gap:
            self.plain_steps += 1
            self.costs.planned(1)
            return StepShape(0, 0)
        self.plain_steps = 0
        self.probe_gap = min(2 * self.probe_gap, self.MAX_PROBE_GAP)  # back to 1 once a probe pays
        return StepShape(min(2, self.max_budget), 1)

    def drafted(self, values_per_seq: list[list[float]], depths_per_seq: list[list[int]],
                draft_s: float, levels: int) -> int:
        """After drafting a planned shape: the budget to keep (the tree is cut to it), and the
        next step's shape from these values (grown by one level / twice the nodes when the whole
        drafted tree was worth it, so a plan can grow again)."""
        if levels > 0:
            self.costs.drafted(levels, draft_s)
        keep = self.choose(values_per_seq, draft_s)
        self.costs.planned(keep + 1)
        nodes, depth, pays = self._best_shape(values_per_seq, depths_per_seq)
        if not pays:
            self.shape = StepShape(0, 0)
            return keep
        self.probe_gap = 1
        drafted_nodes = max((len(v) for v in values_per_seq), default=0)
        drafted_depth = max((max(d, default=0) for d in depths_per_seq), default=0)
        grow = nodes >= drafted_nodes and levels >= drafted_depth  # everything drafted was worth it
        self.shape = StepShape(min(self.max_budget, 2 * nodes if grow else nodes),
                               min(self.max_levels, depth + 1 if grow else depth))
        return keep

    def _best_shape(self, values_per_seq: list[list[float]],
                    depths_per_seq: list[list[int]]) -> tuple[int, int, bool]:
        """(nodes, levels, whether drafting them beats a plain step) for trees like these: the
        best n nodes of a tree need its deepest one drafted, each level at its measured cost."""
        gain = self._gain(values_per_seq)
        levels = np.zeros(len(gain), dtype=np.int64)  # levels[n]: depth the best n nodes need
        for values, depths in zip(values_per_seq, depths_per_seq):
            ranked = [d for _, d in sorted(zip(values, depths), key=lambda t: (-t[0], t[1]))]
            deepest = np.maximum.accumulate(ranked) if ranked else np.zeros(0, np.int64)
            needed = np.full(len(gain), deepest[-1] if len(ranked) else 0, dtype=np.int64)
            needed[0] = 0
            needed[1:1 + len(deepest)] = deepest
            levels = np.maximum(levels, needed)
        cost = np.array([self.costs.step_s(int(n) + 1, int(levels[n])) for n in range(len(gain))])
        rate = gain / np.maximum(cost, 1e-9)
        best = int(np.argmax(rate))
        return best, int(levels[best]), best > 0


@dataclass
class StepShape:
    """A planned step: drafted nodes and drafted levels (0, 0: a plain step)."""

    budget: int
    levels: int


class StepCosts:
    """What a step really costs here, learnt online: seconds to draft L levels (per L: a Medusa
    step costs its heads whatever the depth, a draft model's grows per level), and the factor
    between the verify(+host) time steps took and the curve's (measured once, maybe under another
    load: the factor follows the load now, so that it and a level's cost are measured alike)."""

    DECAY = 0.8
    FREE = 0.05  # drafting every level costs under this fraction of a plain step: draft it all
    MARGIN = 1.05  # drafting must beat a plain step by this factor (noise; a cut tree still runs)

    def __init__(self, curve: LatencyCurve):
        self.curve = curve
        self.draft_times: dict[int, float] = {}  # levels -> seconds to draft them (decayed mean)
        self.scale = 1.0  # verify(+host) time measured / the curve's
        self._draft_end: float | None = None
        self._tokens = 1

    def forget_step(self) -> None:
        self._draft_end = None

    def start_step(self) -> None:
        """A step begins: the previous step's verify + host time is now known."""
        now = time.perf_counter()
        if self._draft_end is not None:
            ratio = float(np.clip((now - self._draft_end) / max(self.curve(self._tokens), 1e-9), 0.2, 5.0))
            self.scale = self.DECAY * self.scale + (1 - self.DECAY) * ratio
        self._draft_end = None

    def planned(self, tokens: int) -> None:
        """Drafting is over; the target will verify `tokens` tree tokens."""
        self._draft_end = time.perf_counter()
        self._tokens = tokens

    def drafted(self, levels: int, seconds: float) -> None:
        known = self.draft_times.get(levels)
        self.draft_times[levels] = seconds if known is None else self.DECAY * known + (1 - self.DECAY) * seconds

    def draft_s(self, levels: int) -> float:
        """Seconds to draft `levels` levels: as measured, else scaled from the nearest depth
        measured (0 while nothing was: a first plan drafts and learns)."""
        if levels <= 0 or not self.draft_times:
            return 0.0
        if levels in self.draft_times:
            return self.draft_times[levels]
        near = min(self.draft_times, key=lambda k: (abs(k - levels), k))
        return self.draft_times[near] * levels / near

    def drafting_is_free(self, levels: int) -> bool:
        return bool(self.draft_times) and self.draft_s(levels) < self.FREE * self.verify_s(1)

    def verify_s(self, tokens: int) -> float:
        return self.curve(tokens) * self.scale

    def step_s(self, tokens: int, levels: int) -> float:
        """A step's seconds; a drafting one carries the margin."""
        cost = self.draft_s(levels) + self.verify_s(tokens)
        return cost * self.MARGIN if tokens > 1 else cost


# On a CPU a verify step grows with the tree (the curve of a 135M model on 2 cores roughly
# doubles by 32 tokens) and a drafted level costs a fair part of a target step, so the default
# tree there is small and sized per step: (node budget, levels) caps for `auto` with plan ahead.
CPU_TREE_CAPS = {"lookup": (16, 8)}  # drafting an n-gram lookup is free: longer chains pay
CPU_TREE_CAPS_DEFAULT = (8, 4)


def machine_default_tree(manifest_default: dict, kind: str | None, device: str) -> dict:
    """The tree a request gets when it names none. On the CPU: `auto` with the budget planned
    before drafting (a plain step when drafting does not pay here); elsewhere the manifest's
    default (the GPU trees the exporter chose, e.g. eagle2 d6 k8 n64 for EAGLE)."""
    if device != "cpu" or kind is None or manifest_default.get("policy", "none") == "none":
        return manifest_default
    budget, levels = CPU_TREE_CAPS.get(kind, CPU_TREE_CAPS_DEFAULT)
    return {"policy": "auto", "plan": "ahead", "budget": budget, "max_depth": levels}


def expected_tokens_per_second(values: list[float], draft_s: float, curve: LatencyCurve) -> float:
    """E(tree) / (draft + verify) for one tree given its nodes' log values."""
    return (1.0 + sum(math.exp(v) for v in values)) / (draft_s + curve(len(values) + 1))

"""Load-aware tree sizing for the batch engine (runtime/batching.py): the node budget per sequence
from the verify-latency curve measured at the current batch width, down to plain decoding when
speculation stops paying (issue 17).

Why: a tree of n nodes per sequence makes the target step verify W x (n + 1) tokens for a batch of
W. At batch 1 the device is latency bound and a 64-node tree costs about what one token costs; at
batch 64 the same trees are 4096 tokens and the step is compute bound, so the trees that paid at
batch 1 can make speculation slower than plain decoding (vLLM reports 1.4-1.8x slowdowns at high
request rates). So the engine picks the budget n per step that maximises tokens per second:

    E(n) / (draft_s(n) + L_W(n + 1))

* L_W: seconds of one target step [W, T] against T, a LatencyCurve (runtime/trees/auto.py) per
  batch width W, measured when the engine first runs at W (it is idle then: measuring resets the
  cache). W is the width the engine steps (all of its slots), not the number of running requests.
* E(n): tokens a sequence gains per step with n nodes. After each verified step, for every
  candidate n <= the drafted nodes, the tokens that step would have given had its tree been cut to
  its n best nodes by cumulative draft log-probability (what every policy keeps when its budget is
  smaller; ancestor-closed, since a child never scores above its parent) follow from the ranks of
  the accepted path's nodes. An exponential moving average per n. E(0) = 1: plain decoding.
* draft_s(n): the measured draft time of steps drafted with n nodes at width W (drafting W trees costs
  more than one: priced with the width-1 drafts, the sizer kept full trees at 8 streams, where drafting
  them took 6.3 ms a step on the H100): the median of its last DRAFT_SAMPLES (a budget not yet drafted
  borrows the nearest larger one's, a width not yet drafted the nearest width's), less the drafter's
  one-off work (Drafter.one_off_s): the first draft of a shape captures its CUDA graph (tens of ms),
  and a draft after plain steps or an admission first feeds the drafter the features it missed
  (EAGLE's catch-up). With those in, the first H200 serving runs priced every tree out for good:
  plain steps record nothing to wash such a sample out.
The full budget is drafted now and then, so the estimates of larger budgets follow the text
(acceptance changes with the prompt): every EXPLORE_EVERY steps while it is (nearly) the best
choice, less often the dearer its step is than the chosen one's, so that exploring never costs more
than about 1/EXPLORE_EVERY of the time (at 64 streams a full tree's step costs ~10 plain ones).
Where plain decoding was the best choice PLAIN_RUN steps in a row at a width of several requests, or
even the best acceptance seen so far could not pay for a tree at the width (LoadSizer.pays), the engine
stops speculating for its greedy requests altogether, newcomers included, until the width changes: a
plain slot costs what it costs in a plain server (no explorations, no drafter bookkeeping, no EAGLE
catch-up of missed features), which is what "never slower than plain decoding under load" needs (at 32
and 64 streams on the H100 the sizer chose budget 0 and the server still made 0.57-0.65x plain
decoding's tokens/s, its draft phase 4-7x plain's).
Lossless whatever n is: verification is exact, and only greedy requests are sized (a sampled
request keeps its tree, so its random draws stay those of the request sent alone).
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from treespec.runtime.backends.base import TreeBackend
from treespec.runtime.trees.auto import LatencyCurve, time_steps
from treespec.runtime.trees.config import TreeConfig
from treespec.runtime.trees.policies import path_values
from treespec.runtime.trees.tree import Tree
from treespec.runtime.verify import Verdict

CANDIDATES = (0, 2, 4, 8, 16, 24, 32, 48, 63, 96, 127)  # node budgets per sequence (+ the config's own)
EXPLORE_EVERY = 16
EXPLORE_EVERY_MAX = 1024
EMA = 0.1
DRAFT_SAMPLES = 5
MEASURE_PAST = 64  # cached tokens per sequence while the curve is measured
MEASURE_REPS = 3
MEASURED_TOKENS = 64  # tree tokens per sequence measured (larger trees: the curve's last segment extrapolated)
RULE_OUT_AFTER = 8  # drafted steps seen before pays() may rule trees out (one text that accepts nothing must not)
PLAIN_RUN = 64  # choices of plain decoding in a row at a width of several requests that rule trees out there
PLAIN = TreeConfig(policy="none")


def sized(cfg: TreeConfig, budget: int) -> TreeConfig:
    """The slot's tree config with `budget` drafted nodes (0: plain decoding). `auto` grows an OPT
    tree to its budget and cuts it by its own batch-1 planner: here the engine sizes it instead."""
    if budget <= 0 or cfg.policy == "none":
        return PLAIN
    if cfg.policy == "auto":
        return TreeConfig(policy="opt", budget=budget, delta=cfg.delta, max_depth=cfg.max_depth)
    return replace(cfg, budget=min(budget, cfg.budget))


def max_budget(cfg: TreeConfig) -> int:
    return 0 if cfg.policy == "none" else cfg.budget


def measure_width(backend: TreeBackend, width: int, capacity: int, sizes: list[int]) -> LatencyCurve:
    """Seconds of one target step [width, T] for each T in sizes, against MEASURE_PAST cached tokens
    per sequence. Resets the backend's cache (only while the engine is idle)."""
    backend.reset(width, capacity)
    past = min(MEASURE_PAST, capacity - max(sizes) - 1)
    return time_steps(backend, width, past, sizes, MEASURE_REPS)


def tokens_if_cut(tree: Tree, verdict: Verdict, budgets: list[int]) -> dict[int, int]:
    """For each budget n <= the tree's drafted nodes: the tokens this step gives with the tree cut to
    its n best nodes (by cumulative log-probability, ties to the earlier node: parents first)."""
    drafted = len(tree) - 1
    values = path_values(tree)
    order = sorted(range(1, len(tree)), key=lambda i: (-values[i], i))
    rank = {node: r for r, node in enumerate(order)}
    prefix, worst = [], -1
    for node in verdict.path[1:]:  # the accepted drafted nodes, root's child first
        worst = max(worst, rank[node])
        prefix.append(worst)
    return {n: 1 + sum(r < n for r in prefix) for n in budgets if n <= drafted}


@dataclass
class LoadSizer:
    """Chooses the shared node budget of each batched step; see the module's head."""

    max_tree_tokens: int  # the target graph's profile: T per sequence at most
    curves: dict[int, LatencyCurve] = field(default_factory=dict)
    gain: dict[int, float] = field(default_factory=dict)  # E(n)
    best_gain: dict[int, float] = field(default_factory=dict)  # the highest E(n) estimate so far (pays())
    recorded: int = 0  # drafted steps recorded
    plain_run: dict[int, int] = field(default_factory=dict)  # per width: choices of budget 0 in a row
    rule_out_after: int = RULE_OUT_AFTER
    draft_s: dict[tuple[int, int], deque] = field(default_factory=dict)  # recent draft seconds per (width, budget)
    steps: int = 0
    explored: int = 0  # the step that last drafted the full budget
    budget: int = 0  # the last choice (metrics)
    tokens_per_step: float = 0.0  # moving average over speculative slot-steps (metrics)

    def candidates(self, full: int) -> list[int]:
        return sorted({n for n in CANDIDATES if n < full and n + 1 <= self.max_tree_tokens} | {full})

    def sizes(self, full: int) -> list[int]:
        return sorted({n + 1 for n in self.candidates(full)} | {1})

    def needs_curve(self, width: int) -> bool:
        return width not in self.curves

    def measure(self, backend: TreeBackend, width: int, capacity: int, budget: int = MEASURED_TOKENS) -> LatencyCurve:
        """The curve at `width` for trees up to `budget` nodes (at least 15, at most what the target takes
        and MEASURED_TOKENS - 1; larger trees extrapolate the last segment)."""
        full = min(self.max_tree_tokens, MEASURED_TOKENS, max(budget, 15) + 1) - 1
        self.curves[width] = measure_width(backend, width, capacity, self.sizes(full))
        return self.curves[width]

    def pays(self, width: int, full: int) -> bool:
        """Whether trees may still pay at `width`. False where the sizer chose plain decoding PLAIN_RUN
        times in a row at a width of several requests (their texts together, not one of them), or where
        drafting and verifying even a tree with the best acceptance seen so far (each budget's highest
        estimate) costs more than the tokens it would add. Then the engine decodes its greedy requests
        plainly, drafter untouched (BatchEngine._plain_under_load): a speculative server under that load
        pays neither the explorations nor EAGLE's feature catch-up."""
        curve = self.curves.get(width)
        if curve is None or self.recorded < self.rule_out_after or full <= 0:
            return True
        if width > 1 and self.plain_run.get(width, 0) >= PLAIN_RUN:
            return False
        plain, drafts = 1.0 / curve(1), self._drafts(width)
        for n in self.candidates(full):
            best = _at_or_below(self.best_gain, n)
            if n > 0 and best is not None and best / (_draft(drafts, n) + curve(n + 1)) > plain:
                return True
        return False

    def choose(self, width: int, full: int) -> int:
        """The budget for the next step of a batch of `width` whose configs allow up to `full` nodes."""
        self.steps += 1
        if full <= 0:
            self.budget = 0
            return 0
        if not self.gain or width not in self.curves:
            self.budget = full  # explore: every candidate's estimate is refreshed from this step
        else:
            curve = self.curves[width]
            drafts = self._drafts(width)
            cost = {n: _draft(drafts, n) + curve(n + 1) for n in self.candidates(full)}
            rate = {n: self._gain(n) / cost[n] for n in cost}
            best = max(rate, key=lambda n: (rate[n], -n))
            every = min(EXPLORE_EVERY * max(1.0, cost[full] / cost[best]), EXPLORE_EVERY_MAX)
            self.budget = full if self.steps - self.explored >= every else best
            self.plain_run[width] = self.plain_run.get(width, 0) + 1 if best == 0 else 0
        if self.budget == full:
            self.explored = self.steps
        return self.budget

    def _gain(self, n: int) -> float:
        gain = _at_or_below(self.gain, n) if n > 0 else 1.0
        return 1.0 if gain is None else gain  # never drafted at or below n: assume nothing

    def _drafts(self, width: int) -> dict[int, float]:
        """Median draft seconds per budget at `width`, or at the nearest width that drafted ({}: none)."""
        if not self.draft_s:
            return {}
        near = min({w for w, _ in self.draft_s}, key=lambda w: (abs(w - width), w))
        return {m: statistics.median(q) for (w, m), q in self.draft_s.items() if w == near}  # (numpy's: 15 us)

    def record(self, width: int, budget: int, draft_s: float, steps: list[tuple[Tree, Verdict]]) -> None:
        """After a verified step of `width` drafted with `budget` nodes: its draft time (one-off work left out)
        and, per candidate n, the tokens its trees would have given cut to n nodes."""
        if budget <= 0 or not steps:
            return
        self.draft_s.setdefault((width, budget), deque(maxlen=DRAFT_SAMPLES)).append(draft_s)
        self.recorded += 1
        sums: dict[int, list[int]] = {}
        for tree, verdict in steps:
            for n, tokens in tokens_if_cut(tree, verdict, self.candidates(budget)).items():
                sums.setdefault(n, []).append(tokens)
        for n, values in sums.items():
            self.gain[n] = _ema(self.gain.get(n), float(np.mean(values)))
            self.best_gain[n] = max(self.best_gain.get(n, 0.0), self.gain[n])
        self.tokens_per_step = _ema(self.tokens_per_step or None, float(np.mean([len(v.tokens) for _, v in steps])))


def _at_or_below(table: dict[int, float], n: int) -> float | None:
    """The estimate of the largest budget <= n in `table` (None: nothing drafted at or below n)."""
    known = [m for m in table if m <= n]
    return table[max(known)] if known else None


def _draft(drafts: dict[int, float], n: int) -> float:
    """Draft seconds for n nodes from LoadSizer._drafts: the nearest larger budget's (else the largest)."""
    if n == 0 or not drafts:
        return 0.0
    larger = [m for m in drafts if m >= n]
    return drafts[min(larger) if larger else max(drafts)]


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new

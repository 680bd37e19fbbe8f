"""In-flight (continuous) batching: concurrent requests share one running batch of ragged trees.

Why: one generator runs one request at a time, so on the CPU 8 concurrent requests took 0.91x the
time of the same 8 sent one by one (issue 17). Here, as in vLLM / SGLang / TensorRT-LLM in-flight
batching, the schedule changes only at step boundaries: the batch is a fixed set of slots (one KV
row range each: the backends take ragged batches, [B, T] trees with per-sequence past lengths,
padding nodes that see only themselves, commits that move only accepted rows). Each engine turn
  1. admits the waiting requests into free slots: one prefill step for the newcomers (the running
     slots get a one-token padding tree and commit nothing, so they are untouched), then
  2. steps every running slot together: each drafts its own tree, one target step scores them all,
     each is verified with its own sampling and rng, commits its own path, and a slot whose request
     is finished (EOS, max_tokens, cancelled) is freed at once, without stalling the others.
A request never waits for a batch to fill: an idle engine admits the first request alone.

Lossless: a slot's tokens are what the same request gives alone (greedy, or sampled with its own
seed: its rng is used in the same order). Requests the slots cannot carry exactly -- trees whose
children are sampled from the drafter, sampled `auto` trees, typical acceptance, the draft LM
(its own KV cache) -- run alone as exclusive jobs between batches (`batchable`). EAGLE's slots
are reset per request (Drafter.reset_slot).

Load: the batch width (the slots the backend steps, padding included) follows demand: when the
engine is empty it allocates the smallest width in WIDTHS that holds the requests seen over the
last SHRINK_AFTER_S, and when more requests wait than it holds it stops admitting until its
running requests finish, then grows (one request's time, once per rise in load). At one stream
it steps a batch of 1, like the Python API. The node budget of greedy requests' trees is chosen
per step for the current width (runtime/batch_sizing.py), down to plain decoding, and where the load
rules trees out at the width, greedy requests decode plainly with the drafter left alone
(_plain_under_load). A request alone keeps its own tree, as the Python API drafts it.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from treespec.runtime.backends.base import StepInputs, StepOutputs
from treespec.runtime.batch_sizing import PLAIN, LoadSizer, max_budget, sized
from treespec.runtime.drafters.base import Features
from treespec.runtime.generator import TreeGenerator
from treespec.runtime.trees.config import TreeConfig
from treespec.runtime.trees.policies import draft_trees
from treespec.runtime.trees.tree import Tree, batch_tree_inputs, chain_tree
from treespec.runtime.verify import SamplingParams, sample_from, target_distribution, verify_tree

PAD_TREE = chain_tree([0])
PLAIN_ENTRY = ("none", PLAIN)  # a non-drafting slot's (group key, tree config)
WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHRINK_AFTER_S = 2.0  # a width holds while demand was that high this recently
PHASES = ("admit", "draft", "target", "host")
RECORD_SLOTS = 8  # slots per step whose trees feed the sizer's estimates (~0.1 ms each on the host)


@dataclass
class SlotRequest:
    """One request for a slot. emit(new_ids, finished) returns False to stop it (client left, deadline)."""
    prompt: list[int]
    max_new_tokens: int
    tree: TreeConfig
    sampling: SamplingParams
    seed: int | None
    emit: Callable[[list[int], bool], bool]
    fail: Callable[[Exception], None] = lambda exc: None  # the engine failed it (a backend error)
    cancelled: Callable[[], bool] = lambda: False  # its client left: not admitted, its slot freed


@dataclass
class _Slot:
    req: SlotRequest
    rng: np.random.Generator
    limit: int
    produced: int = 0
    root: int = 0
    done: bool = False
    tree_key: str = ""  # repr of its tree config, once: slots with equal configs draft together
    drafting: bool = True  # False: decodes plainly (tree none, or the load rules trees out), drafter untouched


@dataclass
class _Job:
    """Work that needs the whole generator (a request the slots cannot carry): run between batches."""
    run: Callable[[], None]


@dataclass
class EngineStats:
    steps: int = 0  # batched verification steps
    prefills: int = 0
    slot_steps: int = 0  # sum over steps of the running slots (mean batch = slot_steps / steps)
    jobs: int = 0
    peak: int = 0  # most slots running at once
    tokens: int = 0
    cancelled: int = 0  # slots freed because their client left
    width: int = 0  # the batch the backend steps now
    running: int = 0
    budget: int = 0  # nodes per sequence the last sized step drafted (0: plain decoding)
    resizes: int = 0
    plain_under_load: int = 0  # greedy requests decoded plainly because no tree paid at their width
    # Where the engine thread's time goes, cumulative (the metrics endpoint's
    # treespec_engine_<phase>_seconds_total): prefills of newcomers, drafting (sizing included), the
    # target step (its host packing and output copy included), and the rest of a step on the host
    # (verification, commit, handing tokens to the requests, the drafter's bookkeeping).
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


def batchable(engine: TreeGenerator, tree: TreeConfig, sampling: SamplingParams) -> bool:
    """Whether a request can share the slots and still give exactly its lone output."""
    if sampling.acceptance != "exact":
        return False
    if tree.policy == "none":
        return True
    resets = engine.drafter is not None and engine.drafter.resets_slots
    return resets and (sampling.greedy or (tree.policy != "auto" and not tree.sample_children))


def drain(q: queue.Queue, block: bool = True, timeout: float | None = None) -> list:
    """Everything queued now: waits (up to `timeout`) for the first item when `block`, then takes
    what else is there without waiting; [] when nothing came."""
    items = []
    try:
        items.append(q.get(block=block, timeout=timeout))
        while True:
            items.append(q.get_nowait())
    except queue.Empty:
        pass
    return items


class BatchEngine:
    """The slots over one TreeGenerator's target and drafter, stepped by one thread."""

    def __init__(self, engine: TreeGenerator, slots: int, max_tree_tokens: int, sizing: bool = True,
                 elastic: bool = True, budget: int = 63):
        """slots: the most requests decoded at once; sizing: choose greedy trees' budgets per step
        (runtime/batch_sizing.py) from latency curves measured up to `budget` nodes (the default tree's);
        elastic: the batch width follows demand (else always `slots`)."""
        self.engine, self.target = engine, engine.target
        # only a drafter that can reset one slot (Drafter.resets_slots); with others, slots decode plainly
        self.drafter = engine.drafter if engine.drafter is not None and engine.drafter.resets_slots else None
        self.max_slots, self.elastic = slots, elastic
        self.slots: list[_Slot | None] = []
        self.capacity = engine.max_context + max_tree_tokens + 2
        self.sizer = LoadSizer(max_tree_tokens) if sizing else None
        self._sized: dict[tuple[str, int], TreeConfig] = {}  # (tree key, budget) -> the sized config
        self.measure_budget = budget
        self.stats = EngineStats()
        self._demand: deque = deque()  # (time, requests running + waiting)
        self._growing = False  # more wait than the width holds: admit none until the batch drains
        self._queue: queue.Queue = queue.Queue()
        self._waiting: list[SlotRequest] = []
        self._fresh = True  # the cache needs a reset (first use, or after an exclusive job)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="treespec-batch", daemon=True)
        self._thread.start()

    def submit(self, item: SlotRequest | Callable[[], None]) -> None:
        self._queue.put(item if isinstance(item, SlotRequest) else _Job(item))

    def close(self) -> None:
        self._stop = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # the loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        pending: list = []
        while not self._stop:
            running = any(self.slots)
            pending += self._drain(block=not running and not pending)
            if self._stop:
                break
            if not running and pending and isinstance(pending[0], _Job):
                self._exclusive(pending.pop(0))
                continue
            pending = [p for p in pending if not (isinstance(p, SlotRequest) and p.cancelled())]
            self._fit_width(pending)
            admit = []
            while (not self._growing and pending and isinstance(pending[0], SlotRequest)
                   and len(admit) < self.free()):
                admit.append(pending.pop(0))  # FIFO: a job waits for the batch to drain, later ones behind it
            try:  # a backend failure fails the requests it touched; the engine serves on
                if admit:
                    start = time.perf_counter()
                    self._admit(admit)
                    self.stats.seconds["admit"] += time.perf_counter() - start
            except Exception as exc:
                self._fail_all(exc, admit)
                continue
            self._free_cancelled()
            try:
                if any(self.slots):
                    self._step()
            except Exception as exc:
                self._fail_all(exc, [])

    def _fit_width(self, pending: list) -> None:
        """The batch width for the demand (see the module's head); resized only while no slot runs."""
        running = sum(s is not None for s in self.slots)
        waiting = sum(isinstance(p, SlotRequest) for p in pending)
        now = time.monotonic()
        self._demand.append((now, running + waiting))
        while self._demand and now - self._demand[0][0] > SHRINK_AFTER_S:
            self._demand.popleft()
        want = self.max_slots
        if self.elastic:
            demand = max(d for _, d in self._demand)
            want = next((w for w in WIDTHS if w >= demand), WIDTHS[-1])
            want = min(want, self.max_slots)
        if running:
            self._growing = want > len(self.slots) and waiting > self.free()
            return
        self._growing = False
        if want != len(self.slots) and (waiting or not self.slots):
            self._resize(want)

    def _resize(self, width: int) -> None:
        self.slots = [None] * width
        self._fresh = True
        self.stats.width, self.stats.resizes = width, self.stats.resizes + 1
        if self.sizer is not None and self.drafter is not None and self.sizer.needs_curve(width):
            self.sizer.measure(self.target, width, self.capacity, self.measure_budget)

    def _fail_all(self, exc: Exception, admitted: list[SlotRequest]) -> None:
        failed = {id(r): r for r in admitted}
        failed.update((id(s.req), s.req) for s in self.slots if s is not None)
        self.slots = [None] * len(self.slots)
        self._fresh = True
        for req in failed.values():
            try:
                req.fail(exc)
            except Exception:
                pass

    def _drain(self, block: bool) -> list:
        return [i for i in drain(self._queue, block) if i is not None]

    def _free_cancelled(self) -> None:
        """Slots whose client left are freed before the next step (their answer went out already)."""
        for b, slot in enumerate(self.slots):
            if slot is not None and slot.req.cancelled():
                self.slots[b] = None
                self.stats.cancelled += 1

    def free(self) -> int:
        return sum(s is None for s in self.slots)

    def _exclusive(self, job: _Job) -> None:
        self.stats.jobs += 1
        try:
            job.run()
        finally:
            self._fresh = True

    # admission: one prefill step for the newcomers ---------------------------------------------
    def _admit(self, requests: list[SlotRequest]) -> None:
        if self._fresh:
            widest = max((r.tree.max_nodes if self.drafter is not None else 1 for r in requests), default=1)
            self.target.plan(len(self.slots) * widest)
            self.target.reset(len(self.slots), self.capacity)
            if self.drafter is not None:
                self.drafter.reset([[0] for _ in self.slots], self.capacity)
            self._fresh = False
        placed: dict[int, _Slot] = {}
        for req in requests:
            b = self.slots.index(None)
            limit = min(req.max_new_tokens, self.engine.max_context - len(req.prompt))
            drafting = self.drafter is not None and req.tree.policy != "none" and not self._plain_under_load(req)
            self.slots[b] = placed[b] = _Slot(req, np.random.default_rng(req.seed), limit, tree_key=repr(req.tree),
                                              drafting=drafting)
            self.target.lengths[b] = 0  # the slot's old rows are dead: past_lengths masks them
        trees = [chain_tree(placed[b].req.prompt) if b in placed else PAD_TREE for b in range(len(self.slots))]
        out = self._target_step(trees)
        self.target.commit(out, [list(range(len(placed[b].req.prompt))) if b in placed else []
                                 for b in range(len(self.slots))])
        self.stats.prefills += 1
        for b, slot in placed.items():
            last = len(slot.req.prompt) - 1
            slot.root = self._first_token(out, b, last, slot)
            if slot.drafting:
                self.drafter.reset_slot(b, slot.req.prompt + [slot.root])
                self.drafter.accept(b, [], Features(out.hidden_states, b, list(range(len(slot.req.prompt)))))
            self._emit(b, [slot.root])

    def _plain_under_load(self, req: SlotRequest) -> bool:
        """Whether a greedy request is decoded plainly because the load rules trees out at this width
        (LoadSizer.pays): then it costs what it costs in a plain server."""
        plain = (self.sizer is not None and req.sampling.greedy and req.tree.policy != "none"
                 and not self.sizer.pays(len(self.slots), max_budget(req.tree)))
        self.stats.plain_under_load += plain
        return plain

    @staticmethod
    def _first_token(out: StepOutputs, b: int, last: int, slot: _Slot) -> int:
        if slot.req.sampling.greedy:
            return int(out.argmax[b, last]) if out.argmax is not None else int(out.logits[b, last].argmax())
        return sample_from(target_distribution(out.logits[b, last], slot.req.sampling), slot.rng)

    def _target_step(self, trees: list[Tree]) -> StepOutputs:
        if self.drafter is not None:  # features not drafted from yet would not survive this step's outputs
            self.drafter.pin_pending()
        ids, pos, mask = batch_tree_inputs(trees, self.target.lengths)
        return self.target.step(StepInputs(ids, pos, mask))

    # one step of every running slot -------------------------------------------------------------
    def _configs(self) -> dict[int, tuple[str, TreeConfig]]:
        """Each running slot's (group key, tree config) for this step: greedy slots' budgets sized for
        the load (a request alone keeps its tree unless it is `auto`). Equal keys draft together."""
        configs = {b: (s.tree_key, s.req.tree) if s.drafting else PLAIN_ENTRY
                   for b, s in enumerate(self.slots) if s is not None}
        if self.sizer is None or self.drafter is None:
            return configs
        greedy = [b for b in configs if self.slots[b].drafting and self.slots[b].req.sampling.greedy]
        full = max((max_budget(configs[b][1]) for b in greedy), default=0)
        if full > 0 and not self.sizer.pays(len(self.slots), full):  # for good: see _plain_under_load
            for b in greedy:
                self.slots[b].drafting, configs[b] = False, PLAIN_ENTRY
            self.stats.plain_under_load += len(greedy)
            full = 0
        if full <= 0 or len(self.slots) == 1 and all(configs[b][1].policy != "auto" for b in greedy):
            # One request alone keeps its tree, as the Python API drafts it (its steps still feed the
            # estimates): on the H100 the sizer's per-text estimates made 1-stream serving 663 tok/s where
            # fixed trees made 804 (plain 566-611); an `auto` tree is sized (the engine has no planner for it)
            self.stats.budget = full
            return configs
        budget = self.stats.budget = self.sizer.choose(len(self.slots), full)
        for b in greedy:
            key, cfg = configs[b]
            if (key, budget) not in self._sized:
                self._sized[(key, budget)] = sized(cfg, budget)
            configs[b] = (f"{key}@{budget}", self._sized[(key, budget)])
        return configs

    def _draft(self, configs: dict[int, tuple[str, TreeConfig]]) -> tuple[list[Tree], list[dict], float]:
        """Each running slot's tree, grown by its own config (slots sharing a config draft together),
        and the seconds drafting took, one-off work left out (what the sizer prices)."""
        roots = [s.root if s else 0 for s in self.slots]
        trees: list[Tree] = [PAD_TREE] * len(self.slots)
        proposals: list[dict] = [{} for _ in self.slots]
        groups: dict[str, list[int]] = {}
        for b, (key, _) in configs.items():
            groups.setdefault(key, []).append(b)
        if self.drafter is not None:
            self.drafter.return_distributions = False
        draft_s = 0.0
        for members in groups.values():
            cfg = configs[members[0]][1]
            drafter = self.drafter if cfg.policy != "none" else None
            drafted = draft_trees(cfg, drafter, roots, active=[b in members for b in range(len(self.slots))])
            draft_s += drafted.draft_s
            for b in members:
                trees[b], proposals[b] = drafted.trees[b], drafted.proposals[b]
        return trees, proposals, draft_s

    def _step(self) -> None:
        start = time.perf_counter()
        configs = self._configs()
        trees, proposals, draft_s = self._draft(configs)
        drafted = time.perf_counter()
        out = self._target_step(trees)
        verified = time.perf_counter()
        verdicts = {b: verify_tree(trees[b], out, b, s.req.sampling, s.rng, proposals[b])
                    for b, s in enumerate(self.slots) if s is not None}
        self.target.commit(out, [verdicts[b].path if b in verdicts else [] for b in range(len(self.slots))])
        self.stats.steps += 1
        self.stats.slot_steps += len(verdicts)
        self.stats.running = len(verdicts)
        self.stats.peak = max(self.stats.peak, len(verdicts))
        if self.sizer is not None:
            sized_slots = [b for b in verdicts if configs[b][1].policy != "none" and self.slots[b].req.sampling.greedy]
            self.sizer.record(len(self.slots), self.stats.budget, draft_s, [(trees[b], verdicts[b]) for b in
                                                           _sample(sized_slots, RECORD_SLOTS, self.stats.steps)])
        for b, verdict in verdicts.items():
            slot = self.slots[b]
            slot.root = verdict.tokens[-1]
            if self._emit(b, verdict.tokens) and slot.drafting:
                self.drafter.accept(b, verdict.tokens, Features(out.hidden_states, b, verdict.path))
        seconds = self.stats.seconds
        seconds["draft"] += drafted - start
        seconds["target"] += verified - drafted
        seconds["host"] += time.perf_counter() - verified

    def _emit(self, b: int, tokens: list[int]) -> bool:
        """Cut at EOS / the limit, hand the tokens to the request; free the slot when it is done."""
        slot = self.slots[b]
        kept = []
        for token in tokens[:slot.limit - slot.produced]:
            kept.append(token)
            if token in self.engine.eos:
                slot.done = True
                break
        slot.produced += len(kept)
        slot.done = slot.done or slot.produced >= slot.limit
        self.stats.tokens += len(kept)
        try:
            keep_going = slot.req.emit(kept, slot.done)
        except Exception:  # the request's callback failed (its client left): only that slot ends
            keep_going = False
        if slot.done or not keep_going:
            self.slots[b] = None
            return False
        return True


def _sample(items: list[int], count: int, turn: int) -> list[int]:
    """At most `count` of `items`, a different window each turn (every slot is seen in turn)."""
    if len(items) <= count:
        return items
    start = (turn * count) % len(items)
    return (items + items)[start:start + count]

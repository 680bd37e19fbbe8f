"""The decoding loop in the algorithm's own words: prefill, then per step draft -> verify -> advance.

Token-level only (no text): runtime/api.py adds the tokenizer, presets and streaming of text.
Each sequence of a batch has its own (ragged) tree; the trees are padded into one target call and
every sequence keeps its own KV length. `TreeGenerator.run` reads as those steps; one `_Run`
carries a generation's state between them (no tuple returns, no attributes set on others).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from treespec.runtime.trees.auto import AutoPlanner, LatencyCache, LatencyCurve, measure_latency
from treespec.runtime.backends.base import StepInputs, TreeBackend
from treespec.runtime.backends.base import StepOutputs
from treespec.runtime.drafters.base import Drafter, Features
from treespec.runtime.trees.policies import DraftedTrees, TreeConfig, draft_trees
from treespec.runtime.trees.tree import Tree, batch_tree_inputs, chain_tree
from treespec.runtime.verify import (SamplingParams, Verdict, sample_from, target_distribution,
                                     verify_greedy_ids, verify_tree)

__all__ = ["StepEvent", "Stats", "TreeGenerator", "verify_greedy_ids", "Verdict"]


@dataclass
class StepEvent:
    """What one decoding step produced for each sequence (empty lists for finished ones)."""

    new_tokens: list[list[int]]
    finished: list[bool]


@dataclass
class Stats:
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    host_s: float = 0.0
    steps: int = 0
    accepted: list[int] = field(default_factory=list)  # tokens produced per verify step, all seqs
    tree_sizes: list[int] = field(default_factory=list)
    tree_depths: list[int] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)  # `auto`: the node budget chosen per step
    new_tokens: int = 0
    policy: str = "none"
    acceptance: str = "exact (lossless)"
    lossless: bool = True
    sampled_children: bool = False  # some children were drawn from the drafter's q (and verified against it)

    @property
    def decode_s(self) -> float:
        return self.draft_s + self.verify_s + self.host_s

    def as_dict(self) -> dict:
        mean = float(np.mean(self.accepted)) if self.accepted else 0.0
        total = self.prefill_s + self.decode_s
        out = {
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "mean_accepted": round(mean, 4),
            "mean_tree_size": round(float(np.mean(self.tree_sizes)), 2) if self.tree_sizes else 0.0,
            "mean_tree_depth": round(float(np.mean(self.tree_depths)), 2) if self.tree_depths else 0.0,
            "accepted_histogram": np.bincount(self.accepted).tolist() if self.accepted else [],
            "tokens_per_s": round(self.new_tokens / total, 3) if total > 0 else 0.0,
            "decode_tokens_per_s": round(max(self.new_tokens - 1, 0) / self.decode_s, 3)
            if self.decode_s > 0 else 0.0,
            "time_s": {"prefill": round(self.prefill_s, 4), "draft": round(self.draft_s, 4),
                       "verify": round(self.verify_s, 4), "host": round(self.host_s, 4)},
            "tree_policy": self.policy,
            "acceptance": self.acceptance,
            "lossless": self.lossless,
        }
        if self.sampled_children:
            out["sampled_children"] = True
        if self.budgets:
            out["auto_budget_mean"] = round(float(np.mean(self.budgets)), 2)
        return out


@dataclass
class _Run:
    """One generation's state, threaded through the steps of `TreeGenerator.run`."""

    tree: TreeConfig
    sampling: SamplingParams
    rng: np.random.Generator
    drafter: Drafter | None  # None for --tree none
    sample_children: bool  # children drawn from the drafter's q (exact sampling only)
    planner: AutoPlanner | None  # `auto`: picks each step's node budget
    capacity: int  # KV rows per sequence (the target's and the drafter's)
    limits: list[int]  # new tokens each sequence may produce
    produced: list[int]
    finished: list[bool]
    roots: list[int] = field(default_factory=list)  # each sequence's last token: its next tree root


class TreeGenerator:
    def __init__(self, target: TreeBackend, drafter: Drafter | None, eos_token_ids: list[int],
                 max_context: int, latency_cache: LatencyCache | None = None):
        self.target = target
        self.drafter = drafter
        self.eos = set(eos_token_ids)
        self.max_context = max_context
        self.stats = Stats()
        self.latency_cache = latency_cache  # where `auto` keeps its measured latency curve
        self.latency: LatencyCurve | None = None  # set to skip measuring (tests, a known device)
        self.planner: AutoPlanner | None = None  # `auto`: kept between generations

    def latency_curve(self, max_size: int) -> LatencyCurve:
        """The verify latency curve up to `max_size` tree tokens: cached, or measured now (which
        resets the target's cache: only call it between generations)."""
        if self.latency is not None and self.latency.max_size >= max_size:
            return self.latency
        curve = self.latency_cache.get(max_size) if self.latency_cache is not None else None
        if curve is None:
            curve = measure_latency(self.target, max_size)
            if self.latency_cache is not None:
                self.latency_cache.put(curve)
        self.latency = curve
        return curve

    def run(self, prompts: list[list[int]], max_new_tokens: int, tree: TreeConfig,
            sampling: SamplingParams, seed: int | None = None) -> Iterator[StepEvent]:
        """Yield one StepEvent after the prefill and after every verification step."""
        state = self._start(prompts, max_new_tokens, tree, sampling, seed)
        yield self._prefill(state, prompts)
        while not all(state.finished):
            drafted = self._draft(state)  # one tree per sequence
            out = self._verify_step(drafted)  # the target scores every tree in one step
            verdicts = self._verify(state, drafted, out)  # the longest path the target agrees with
            yield self._advance(state, drafted, out, verdicts)  # commit, emit, feed the drafter

    def _start(self, prompts: list[list[int]], max_new_tokens: int, tree: TreeConfig,
               sampling: SamplingParams, seed: int | None) -> _Run:
        """Fresh stats, the target's cache sized for the longest sequence, the generation's state."""
        drafter = self.drafter if tree.policy != "none" else None
        # Children drawn from the drafter's q only where the exact rule can use q.
        sample_children = (drafter is not None and tree.sample_children and not sampling.greedy
                           and sampling.acceptance == "exact")
        if drafter is not None:
            drafter.return_distributions = sample_children
        self.target.plan(len(prompts) * (tree.max_nodes if drafter is not None else 1))  # before any timing
        planner = self._planner(tree) if drafter is not None and tree.policy == "auto" else None
        self.stats = Stats(policy=tree.policy, acceptance=sampling.label, lossless=sampling.lossless)
        longest = max(len(p) for p in prompts)
        capacity = min(self.max_context, longest + max_new_tokens) + tree.levels + 2
        self.target.reset(len(prompts), capacity)
        return _Run(tree, sampling, np.random.default_rng(seed), drafter, sample_children, planner, capacity,
                    limits=[min(max_new_tokens, self.max_context - len(p)) for p in prompts],
                    produced=[0] * len(prompts), finished=[False] * len(prompts))

    def _planner(self, tree: TreeConfig) -> AutoPlanner:
        """The `auto` planner, kept across generations with the same settings: what it learnt
        (calibration, step costs, the planned size) carries over to the next request."""
        curve = self.latency_curve(tree.max_nodes)
        if self.planner is None or not self.planner.fits(curve, tree.budget, tree.levels):
            self.planner = AutoPlanner(curve, tree.budget, tree.levels)
        self.planner.begin()
        return self.planner

    def _prefill(self, state: _Run, prompts: list[list[int]]) -> StepEvent:
        """Every prompt in one step; the first token from its last position; the drafter primed."""
        t0 = time.perf_counter()
        out = self._target_step([chain_tree(p) for p in prompts])
        self.target.commit(out, [list(range(len(p))) for p in prompts])
        for b, prompt in enumerate(prompts):
            last = len(prompt) - 1
            if state.sampling.greedy:
                token = int(out.argmax[b, last]) if out.argmax is not None else int(out.logits[b, last].argmax())
            else:
                token = sample_from(target_distribution(out.logits[b, last], state.sampling), state.rng)
            state.roots.append(token)
        self.stats.prefill_s = time.perf_counter() - t0
        if state.drafter is not None:  # (not for --tree none: nothing would read what it keeps)
            state.drafter.reset([p + [r] for p, r in zip(prompts, state.roots)], state.capacity)
            for b, prompt in enumerate(prompts):
                state.drafter.accept(b, [], Features(out.hidden_states, b, list(range(len(prompt)))))
        return self._finish([[r] for r in state.roots], state)

    def _draft(self, state: _Run) -> DraftedTrees:
        t0 = time.perf_counter()
        drafted = draft_trees(state.tree, state.drafter, state.roots, active=[not f for f in state.finished],
                              rng=state.rng if state.sample_children else None,
                              temperature=state.sampling.temperature, planner=state.planner,
                              device=self.target.device_trees)
        if drafted.budget is not None:
            self.stats.budgets.append(drafted.budget)
        if state.drafter is not None:  # an `auto` plain step drafted nothing: its features must outlive the step
            state.drafter.pin_pending()
        self.stats.draft_s += time.perf_counter() - t0
        return drafted

    def _verify_step(self, drafted: DraftedTrees) -> StepOutputs:
        """The target's step on the drafted trees. Trees the drafter left on the device are verified
        there, while the host brings them over (drafted.materialize: counted as drafting)."""
        t0 = time.perf_counter()
        if drafted.device_tree is not None:
            out = self.target.step_device(drafted.device_tree, drafted.materialize)
        else:
            out = self._target_step(drafted.trees)
        self.stats.draft_s += drafted.materialize_s
        self.stats.verify_s += time.perf_counter() - t0 - drafted.materialize_s
        return out

    def _target_step(self, trees: list[Tree]) -> StepOutputs:
        ids, pos, mask = batch_tree_inputs(trees, self.target.lengths)
        return self.target.step(StepInputs(ids, pos, mask))

    def _verify(self, state: _Run, drafted: DraftedTrees, out: StepOutputs) -> list[Verdict | None]:
        """Each unfinished sequence's verdict on its tree (None for finished ones)."""
        t0 = time.perf_counter()
        verdicts: list[Verdict | None] = []
        for b, tree in enumerate(drafted.trees):
            if state.finished[b]:
                verdicts.append(None)
                continue
            verdict = verify_tree(tree, out, b, state.sampling, state.rng, drafted.proposals[b])
            self.stats.sampled_children |= bool(drafted.proposals[b])
            self.stats.tree_sizes.append(len(tree))
            self.stats.tree_depths.append(max(tree.depths))
            if state.planner is not None:
                state.planner.record(drafted.expected[b], len(verdict.path) - 1)
            verdicts.append(verdict)
        self.stats.host_s += time.perf_counter() - t0
        return verdicts

    def _advance(self, state: _Run, drafted: DraftedTrees, out: StepOutputs,
                 verdicts: list[Verdict | None]) -> StepEvent:
        """Commit the accepted rows, emit the new tokens, hand the drafter the accepted features."""
        t0 = time.perf_counter()
        self.target.commit(out, [v.path if v is not None else [] for v in verdicts])
        self.stats.steps += 1
        event = self._finish([v.tokens if v is not None else [] for v in verdicts], state)
        self.stats.accepted += [len(e) for e, v in zip(event.new_tokens, verdicts) if v is not None]
        for b, verdict in enumerate(verdicts):
            if verdict is None:
                continue
            state.roots[b] = verdict.tokens[-1]
            if state.drafter is not None and not state.finished[b]:
                state.drafter.accept(b, verdict.tokens, Features(out.hidden_states, b, verdict.path))
        self.stats.host_s += time.perf_counter() - t0
        return event

    def _finish(self, new_tokens: list[list[int]], state: _Run) -> StepEvent:
        """Cut each sequence's new tokens at EOS / its token limit and mark it finished."""
        emitted = []
        for b, tokens in enumerate(new_tokens):
            if state.finished[b]:
                emitted.append([])
                continue
            room = state.limits[b] - state.produced[b]
            kept = []
            for token in tokens[:room]:
                kept.append(token)
                if token in self.eos:
                    state.finished[b] = True
                    break
            state.produced[b] += len(kept)
            if state.produced[b] >= state.limits[b]:
                state.finished[b] = True
            emitted.append(kept)
            self.stats.new_tokens += len(kept)
        return StepEvent(new_tokens=emitted, finished=list(state.finished))

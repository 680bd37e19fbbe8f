"""The decoding loop: prefill, then draft -> build tree -> verify -> commit, for a batch.

Token-level only (no text): runtime/api.py adds the tokenizer, presets and streaming of text.
Each sequence of a batch has its own (ragged) tree; the trees are padded into one target call and
every sequence keeps its own KV length.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from treespec.runtime.trees.auto import AutoPlanner, LatencyCache, LatencyCurve, measure_latency
from treespec.runtime.backends.base import StepInputs, TreeBackend
from treespec.runtime.drafters.base import Drafter
from treespec.runtime.trees.policies import TreeConfig, draft_trees
from treespec.runtime.trees.tree import batch_tree_inputs, chain_tree
from treespec.runtime.verify import (SamplingParams, Verdict, sample_from, target_distribution,
                                     verify_greedy, verify_greedy_ids, verify_sampling, verify_typical)

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
        drafter = self.drafter if tree.policy != "none" else None
        # Children drawn from the drafter's q only where the exact rule can use q.
        sample_children = (drafter is not None and tree.sample_children and not sampling.greedy
                           and sampling.acceptance == "exact")
        if drafter is not None and hasattr(drafter, "return_distributions"):
            drafter.return_distributions = sample_children
        planner = None
        if drafter is not None and tree.policy == "auto":
            planner = AutoPlanner(self.latency_curve(tree.max_nodes), tree.budget)
        self.stats = stats = Stats(policy=tree.policy, acceptance=sampling.label, lossless=sampling.lossless)
        rng = np.random.default_rng(seed)
        batch = len(prompts)
        longest = max(len(p) for p in prompts)
        capacity = min(self.max_context, longest + max_new_tokens) + tree.levels + 2
        self.target.reset(batch, capacity)
        limits = [min(max_new_tokens, self.max_context - len(p)) for p in prompts]
        produced = [0] * batch
        finished = [False] * batch

        t0 = time.perf_counter()
        chains = [chain_tree(p) for p in prompts]
        out = self._verify_step(chains)
        self.target.commit(out, [list(range(len(p))) for p in prompts])
        argmax = getattr(out, "argmax", None)
        first = []
        for b, prompt in enumerate(prompts):
            if sampling.greedy:
                first.append(int(argmax[b, len(prompt) - 1]) if argmax is not None
                             else int(out.logits[b, len(prompt) - 1].argmax()))
            else:
                first.append(sample_from(target_distribution(out.logits[b, len(prompt) - 1], sampling), rng))
        stats.prefill_s = time.perf_counter() - t0
        if self.drafter is not None:
            self.drafter.reset([p + [f] for p, f in zip(prompts, first)], capacity)
            for b, prompt in enumerate(prompts):
                self.drafter.accept(b, [], out.hidden_states[b, len(prompt) - 1])
        roots = first
        event = self._finish([[f] for f in first], produced, limits, finished)
        yield event

        while not all(finished):
            t_draft = time.perf_counter()
            drafted = draft_trees(tree, drafter, roots, active=[not f for f in finished],
                                  rng=rng if sample_children else None,
                                  temperature=sampling.temperature, planner=planner)
            trees = drafted.trees
            if drafted.budget is not None:
                stats.budgets.append(drafted.budget)
            t_verify = time.perf_counter()
            stats.draft_s += t_verify - t_draft
            out = self._verify_step(trees)
            t_host = time.perf_counter()
            stats.verify_s += t_host - t_verify

            argmax = getattr(out, "argmax", None)
            accepted_rows, new_tokens = [], []
            for b, t in enumerate(trees):
                if finished[b]:
                    accepted_rows.append([])
                    new_tokens.append([])
                    continue
                if sampling.greedy and argmax is not None:  # device argmax: no [T, V] copy
                    verdict = verify_greedy_ids(t, argmax[b])
                elif sampling.greedy:
                    verdict = verify_greedy(t, out.logits[b, : len(t)])
                elif sampling.acceptance == "typical":
                    verdict = verify_typical(t, out.logits[b, : len(t)], sampling, rng)
                else:
                    verdict = verify_sampling(t, out.logits[b, : len(t)], sampling, rng, drafted.proposals[b])
                    stats.sampled_children |= bool(drafted.proposals[b])
                accepted_rows.append(verdict.path)
                new_tokens.append(verdict.tokens)
                stats.tree_sizes.append(len(t))
                if planner is not None:
                    planner.record(drafted.expected[b], len(verdict.path) - 1)
                stats.tree_depths.append(max(t.depths))
            self.target.commit(out, accepted_rows)
            stats.steps += 1
            event = self._finish(new_tokens, produced, limits, finished)
            stats.accepted += [len(e) for e, t in zip(event.new_tokens, new_tokens) if t]
            for b in range(batch):
                if new_tokens[b]:
                    roots[b] = new_tokens[b][-1]
                    if self.drafter is not None and not finished[b]:
                        last = accepted_rows[b][-1]
                        self.drafter.accept(b, new_tokens[b], out.hidden_states[b, last])
            stats.host_s += time.perf_counter() - t_host
            yield event

    def _verify_step(self, trees):
        ids, pos, mask = batch_tree_inputs(trees, self.target.lengths)
        return self.target.step(StepInputs(ids, pos, mask))

    def _finish(self, new_tokens, produced, limits, finished) -> StepEvent:
        """Cut each sequence's new tokens at EOS / its token limit and mark it finished."""
        emitted = []
        for b, tokens in enumerate(new_tokens):
            if finished[b]:
                emitted.append([])
                continue
            room = limits[b] - produced[b]
            kept = []
            for token in tokens[:room]:
                kept.append(token)
                if token in self.eos:
                    finished[b] = True
                    break
            produced[b] += len(kept)
            if produced[b] >= limits[b]:
                finished[b] = True
            emitted.append(kept)
            self.stats.new_tokens += len(kept)
        return StepEvent(new_tokens=emitted, finished=list(finished))

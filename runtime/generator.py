"""The decoding loop: prefill, then draft -> build tree -> verify -> commit, for a batch.

Token-level only (no text): runtime/api.py adds the tokenizer, presets and streaming of text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from treespec.runtime.backends.base import StepInputs, TreeBackend
from treespec.runtime.drafters.base import Drafter
from treespec.runtime.policies import TreeConfig, build_trees
from treespec.runtime.tree import batch_tree_inputs, chain_tree
from treespec.runtime.verify import SamplingParams, verify_greedy, verify_sampling


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
    new_tokens: int = 0

    @property
    def decode_s(self) -> float:
        return self.draft_s + self.verify_s + self.host_s

    def as_dict(self) -> dict:
        mean = float(np.mean(self.accepted)) if self.accepted else 0.0
        total = self.prefill_s + self.decode_s
        return {
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "mean_accepted": round(mean, 4),
            "mean_tree_size": round(float(np.mean(self.tree_sizes)), 2) if self.tree_sizes else 0.0,
            "accepted_histogram": np.bincount(self.accepted).tolist() if self.accepted else [],
            "tokens_per_s": round(self.new_tokens / total, 3) if total > 0 else 0.0,
            "decode_tokens_per_s": round(max(self.new_tokens - 1, 0) / self.decode_s, 3)
            if self.decode_s > 0 else 0.0,
            "time_s": {"prefill": round(self.prefill_s, 4), "draft": round(self.draft_s, 4),
                       "verify": round(self.verify_s, 4), "host": round(self.host_s, 4)},
        }


class TreeGenerator:
    def __init__(self, target: TreeBackend, drafter: Drafter | None, eos_token_ids: list[int],
                 max_context: int):
        self.target = target
        self.drafter = drafter
        self.eos = set(eos_token_ids)
        self.max_context = max_context
        self.stats = Stats()

    def run(self, prompts: list[list[int]], max_new_tokens: int, tree: TreeConfig,
            sampling: SamplingParams, seed: int | None = None) -> Iterator[StepEvent]:
        """Yield one StepEvent after the prefill and after every verification step."""
        self.stats = stats = Stats()
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
        first = []
        for b, prompt in enumerate(prompts):
            logits = out.logits[b, len(prompt) - 1]
            first.append(int(logits.argmax()) if sampling.greedy else
                         verify_sampling(chain_tree([prompt[-1]]), logits[None], sampling, rng).tokens[0])
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
            drafter = self.drafter if tree.policy != "none" else None
            trees = build_trees(tree, drafter, roots)
            for b in range(batch):
                if finished[b]:
                    trees[b] = chain_tree([roots[b]])
            t_verify = time.perf_counter()
            stats.draft_s += t_verify - t_draft
            out = self._verify_step(trees)
            t_host = time.perf_counter()
            stats.verify_s += t_host - t_verify

            accepted_rows, new_tokens = [], []
            for b, t in enumerate(trees):
                if finished[b]:
                    accepted_rows.append([])
                    new_tokens.append([])
                    continue
                logits = out.logits[b, : len(t)]
                verdict = (verify_greedy(t, logits) if sampling.greedy
                           else verify_sampling(t, logits, sampling, rng))
                accepted_rows.append(verdict.path)
                new_tokens.append(verdict.tokens)
                stats.tree_sizes.append(len(t))
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

"""Lossless: greedy speculative decoding gives token-for-token what plain decoding gives."""
from __future__ import annotations

import pytest

from treespec.runtime.api import SpeculativeGenerator

LOOKUP_TREES = [
    {"policy": "opt", "budget": 8, "delta": 0.0},
    {"policy": "opt", "budget": 24, "delta": 0.05},
    {"policy": "widths", "widths": [2, 4, 4, 4]},
]


def _plain_and_spec(gen, prompts, tree, max_new_tokens):
    plain = [gen.generate(p, max_new_tokens=max_new_tokens, tree="none").token_ids for p in prompts]
    spec = [gen.generate(p, max_new_tokens=max_new_tokens, tree=tree) for p in prompts]
    return plain, spec


def test_tiny_lookup_lossless_every_tree(tiny_artifacts, bench_prompts):
    gen = SpeculativeGenerator.from_artifacts(tiny_artifacts, drafter="lookup")
    for tree in LOOKUP_TREES:
        plain, spec = _plain_and_spec(gen, bench_prompts[:8], tree, 40)
        assert [s.token_ids for s in spec] == plain, tree


@pytest.mark.slow
def test_smollm2_lookup_lossless_on_bench_prompts(smollm2_artifacts, bench_prompts):
    gen = SpeculativeGenerator.from_artifacts(smollm2_artifacts, drafter="lookup")
    prompts = bench_prompts[:20]
    plain = [gen.generate(p, max_new_tokens=48, tree="none").token_ids for p in prompts]
    accepted = []
    for tree in LOOKUP_TREES[:2]:
        for prompt, want in zip(prompts, plain):
            got = gen.generate(prompt, max_new_tokens=48, tree=tree)
            assert got.token_ids == want, (prompt, tree)
            accepted.append(got.stats["mean_accepted"])
    print(f"mean accepted tokens/step (lookup): {sum(accepted) / len(accepted):.3f}")
    assert min(accepted) >= 1.0

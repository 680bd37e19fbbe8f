"""The Triton tree-attention kernel, run by Triton's interpreter on the CPU, against the reference.

TRITON_INTERPRET=1 has to be set before Triton is imported and must not leak into other tests,
so the cases run in one subprocess (`python -m treespec.plugins.tree_attention.check`) and each
case is reported as its own test here.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict

import pytest

from treespec.plugins.tree_attention.check import Case

TOLERANCE = {"float32": 2e-5, "float16": 2e-3}  # max error relative to the reference's peak


def random_cases(count: int, seed: int = 1234) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        kv_heads = rng.choice([1, 2, 3])
        groups = rng.choice([1, 2, 3, 4])
        tokens = rng.choice([1, 2, 5, 16, 31, 64])
        capacity = rng.choice([0, 7, 64, 100, 256])
        batch = rng.choice([1, 2, 3])
        lengths = tuple(rng.randint(0, capacity) for _ in range(batch))
        cases.append(Case(seed=i, batch=batch, heads=groups * kv_heads, kv_heads=kv_heads, tokens=tokens,
                          head_dim=rng.choice([16, 32, 64]), capacity=capacity, past_lengths=lengths,
                          splits=rng.choice([1, 1, 2, 3]), block_m=rng.choice([None, 16])))
    return cases


CASES = {
    "T64_P256_gqa4_rows_differ": Case(seed=101, batch=3, heads=8, kv_heads=2, tokens=64, head_dim=32,
                                      capacity=256, past_lengths=(256, 131, 0)),
    "T64_P256_split4": Case(seed=102, batch=2, heads=8, kv_heads=2, tokens=64, head_dim=32, capacity=256,
                            past_lengths=(200, 256), splits=4),
    "T1_decode_gqa3": Case(seed=103, batch=2, heads=9, kv_heads=3, tokens=1, head_dim=64, capacity=256,
                           past_lengths=(255, 17)),
    "T1_split": Case(seed=104, batch=1, heads=9, kv_heads=3, tokens=1, head_dim=64, capacity=256,
                     past_lengths=(190,), splits=5),
    "past_empty": Case(seed=105, batch=2, heads=4, kv_heads=1, tokens=16, head_dim=64, capacity=32,
                       past_lengths=(0, 0)),
    "no_cache_rows": Case(seed=106, batch=1, heads=2, kv_heads=2, tokens=8, head_dim=16, capacity=0,
                          past_lengths=(0,)),
    "mha_block16": Case(seed=107, batch=1, heads=4, kv_heads=4, tokens=33, head_dim=32, capacity=96,
                        past_lengths=(95,), block_m=16),
    "levels_4x16_like": Case(seed=108, batch=1, heads=6, kv_heads=2, tokens=21, head_dim=32, capacity=64,
                             past_lengths=(40,), extra={"levels": [4, 8, 8]}),
    "row_sees_nothing": Case(seed=109, batch=1, heads=2, kv_heads=1, tokens=8, head_dim=16, capacity=16,
                             past_lengths=(0,), extra={"hidden_rows": [0, 5]}),
    "scale_given": Case(seed=110, batch=1, heads=4, kv_heads=2, tokens=12, head_dim=32, capacity=48,
                        past_lengths=(30,), scale=0.05),
    "fp16": Case(seed=111, batch=2, heads=6, kv_heads=2, tokens=16, head_dim=32, capacity=64,
                 past_lengths=(64, 9), dtype="float16"),
    "fp16_split": Case(seed=112, batch=1, heads=6, kv_heads=2, tokens=16, head_dim=32, capacity=64,
                       past_lengths=(50,), dtype="float16", splits=3),
}
CASES.update({f"random_{i}": c for i, c in enumerate(random_cases(18))})


@pytest.fixture(scope="module")
def interpreter_results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    payload = json.dumps([asdict(c) for c in CASES.values()])
    run = subprocess.run([sys.executable, "-m", "treespec.plugins.tree_attention.check"], input=payload,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(CASES), run.stderr[-4000:]
    return dict(zip(CASES, results))


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_matches_reference(interpreter_results, name):
    result = interpreter_results[name]
    case = CASES[name]
    assert result["finite"], result
    assert result["rel_err"] <= TOLERANCE[case.dtype], result


def test_cases_cover_the_contract():
    cases = list(CASES.values())
    assert max(c.tokens for c in cases) == 64 and min(c.tokens for c in cases) == 1
    assert max(c.capacity for c in cases) == 256
    assert any(c.heads > c.kv_heads for c in cases)
    assert any(len(set(c.past_lengths)) > 1 for c in cases)
    assert any(c.splits and c.splits > 1 for c in cases) and any(c.splits == 1 for c in cases)

"""Tree-attention kernel on an NVIDIA GPU: Triton launcher and the AOT PTX launched like TensorRT.

Tolerances: max error relative to the fp32 reference's largest magnitude, 2e-3 for fp16 and
1e-2 for bf16 (the reference runs in fp32 on the same rounded inputs).
"""
from __future__ import annotations

import random

import pytest
import torch

from treespec.plugins.tree_attention.check import Case, compare, make_inputs, run_case

pytestmark = pytest.mark.gpu
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2}
LEVELS_69 = [4, 16, 16, 16, 16]  # LongSpec's per-level widths: 69 nodes with the root
HEADS = [(9, 3, 64), (32, 8, 128), (4, 4, 64), (8, 1, 128)]  # SmolLM2, Llama-like, MHA, MQA


def gpu_cases(count: int = 112, seed: int = 7) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        heads, kv_heads, head_dim = HEADS[i % len(HEADS)]
        tokens = [1, 69, 5, 16, 64, 128, 69, 1][i % 8]
        capacity = [0, 8192, 300, 2048, 8192, 64, 1000, 8192][(i // 8) % 8]
        batch = rng.choice([1, 1, 2, 3])
        lengths = tuple(rng.choice([capacity, rng.randint(0, capacity)]) for _ in range(batch))
        cases.append(Case(seed=1000 + i, batch=batch, heads=heads, kv_heads=kv_heads, tokens=tokens,
                          head_dim=head_dim, capacity=capacity, past_lengths=lengths,
                          dtype=["float16", "bfloat16"][i % 2], splits=[None, 1, None, 4][(i // 2) % 4],
                          extra={"levels": LEVELS_69} if tokens == 69 else {}))
    return cases


CASES = gpu_cases()


def test_case_coverage():
    assert len(CASES) >= 100
    assert {1, 69} <= {c.tokens for c in CASES}
    assert any(0 in c.past_lengths for c in CASES) and any(8192 in c.past_lengths for c in CASES)
    assert {c.dtype for c in CASES} == {"float16", "bfloat16"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.dtype}-B{c.batch}-H{c.heads}/{c.kv_heads}-T{c.tokens}-C{c.capacity}-s{c.splits}")
def test_kernel_matches_reference(case):
    result = run_case(case, device="cuda")
    assert result["finite"] and result["rel_err"] <= TOLERANCE[case.dtype], result


AOT_CASES = [
    Case(seed=1, batch=1, heads=9, kv_heads=3, tokens=69, head_dim=64, capacity=8192, past_lengths=(8192,),
         dtype="float16", extra={"levels": LEVELS_69}),
    Case(seed=2, batch=2, heads=32, kv_heads=8, tokens=1, head_dim=128, capacity=8192, past_lengths=(8192, 77),
         dtype="bfloat16"),
    Case(seed=3, batch=3, heads=9, kv_heads=3, tokens=16, head_dim=64, capacity=512, past_lengths=(0, 512, 100),
         dtype="bfloat16"),
    Case(seed=4, batch=1, heads=32, kv_heads=8, tokens=64, head_dim=128, capacity=2048, past_lengths=(2000,),
         dtype="float16"),
]


@pytest.mark.parametrize("driver", ["cuda-python", "ctypes"])
@pytest.mark.parametrize("tactic", [1, 3])
@pytest.mark.parametrize("case", AOT_CASES, ids=lambda c: f"{c.dtype}-H{c.heads}/{c.kv_heads}-T{c.tokens}-C{c.capacity}")
def test_aot_ptx_launched_like_tensorrt(case, tactic, driver):
    """PTX from aot.py, loaded with cuModuleLoadData and launched with cuLaunchKernel using exactly
    aot.plan_launch's grid/block/shared memory and aot.KERNEL_ARGS's argument order."""
    from treespec.plugins.tree_attention import aot
    from treespec.plugins.tree_attention.config import tactic_config
    from treespec.plugins.tree_attention.cuda_launch import PtxKernel
    from treespec.plugins.tree_attention.reference import tree_attention_reference

    if driver == "cuda-python":
        pytest.importorskip("cuda.bindings.driver", reason="cuda-python is not installed")
    inputs = make_inputs(case, device="cuda")
    dtype = {"float16": "fp16", "bfloat16": "bf16"}[case.dtype]
    kernel = aot.fit_shared_memory(dtype, case.head_dim, None, tactic_config(tactic))
    tensors = [inputs["q"], inputs["k_new"], inputs["v_new"], inputs["past_k"], inputs["past_v"],
               inputs["past_lengths"].to(torch.int32), inputs["tree_mask"].to(torch.int32)]
    tensors = [t.contiguous() for t in tensors]
    out = torch.full_like(tensors[0], float("nan"))
    plan = aot.plan_launch(kernel, [tuple(t.shape) for t in tensors])
    launcher = PtxKernel(kernel, driver=driver)
    stream = torch.cuda.current_stream()
    launcher.launch(plan, [t.data_ptr() for t in tensors], [out.data_ptr()], stream=stream.cuda_stream)
    stream.synchronize()
    result = compare(out, tree_attention_reference(**inputs))
    assert result["finite"] and result["rel_err"] <= TOLERANCE[case.dtype], (result, aot.describe(kernel))

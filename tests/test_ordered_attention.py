"""The position-ordered tree-attention kernel (plugins/tree_attention/ordered.py): accurate, and a
node verified inside a tree gets bitwise the output plain decoding gives it (the property that
keeps fp16 greedy speculative decoding lossless on the GPU). CPU: Triton's interpreter in a
subprocess (TRITON_INTERPRET must be set before Triton is imported); GPU: compiled, on CUDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_check(device: str, *extra: str, launch: str | None = None) -> dict:
    env = dict(os.environ)
    if launch is not None:
        env["TREESPEC_ORDERED_ATTENTION"] = launch
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-m", "treespec.plugins.tree_attention.ordered_check",
                           "--device", device, *extra], capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(result: dict) -> None:
    assert result["accuracy_float32"] < 2e-5
    assert result["accuracy_float16"] < 2e-3
    for dtype in ("float16", "float32"):
        inv = result[f"invariance_{dtype}"]
        assert inv["identical"] == inv["nodes"], (dtype, inv)


def test_ordered_kernel_in_the_interpreter():
    result = run_check("cpu", "--small", "--trees", "1")
    check(result)
    print(json.dumps(result))


def test_another_launch_keeps_the_property():
    """TREESPEC_ORDERED_ATTENTION picks the launch (the former default here): every launch must keep
    tree nodes bitwise equal to plain decoding, since each fixes its own summation order."""
    check(run_check("cpu", "--small", "--trees", "1", launch="64,4,1"))


def test_a_bad_launch_is_refused_with_its_rule():
    from treespec.plugins.tree_attention.ordered import OrderedLaunch

    assert OrderedLaunch.parse("128,4,3") == OrderedLaunch()
    for bad in ("100,4,1", "64,3,1", "64,4,9", "64,4", "a,b,c"):
        with pytest.raises(ValueError, match="TREESPEC_ORDERED_ATTENTION"):
            OrderedLaunch.parse(bad)


@pytest.mark.gpu
def test_ordered_kernel_on_the_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (none on this machine)")
    result = run_check("cuda", "--trees", "5")
    check(result)
    print(json.dumps(result))  # identical_sdpa: how often SDPA over the buffer is step-invariant

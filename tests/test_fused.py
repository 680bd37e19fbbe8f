"""The fused decoder step (issue 16) on the CPU, in fp32, under Triton's interpreter: each Triton
kernel against its PyTorch reference, the whole step against TreeDecoder (logits, hidden states,
new K/V) for a tree step with a past, and TorchBackend(fused=True) against the unfused backend.
TRITON_INTERPRET must be set before Triton is imported, so each check runs in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-3  # fp32, relative to the reference's peak


def _run(args: list[str]) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def kernels() -> dict:
    return _run(["-m", "treespec.plugins.fused.check", "--device", "cpu"])


@pytest.mark.parametrize("kernel", ["add_rmsnorm", "rope_write", "silu_mul", "gemm", "rows_linear", "qkv_rope"])
def test_kernel_matches_reference(kernels, kernel):
    assert kernels[f"{kernel}_float32"] < TOLERANCE, kernels
    assert kernels[f"{kernel}_float16"] < 2e-3, kernels


def test_tree_ancestors_kernel_is_exact(kernels):
    assert kernels["ancestors_exact"]


def test_fused_step_matches_tree_decoder():
    result = _run([str(REPO / "tests" / "support" / "fused_step_check.py")])
    for name in ("decoder", "decoder_triton_gemm", "decoder_bias", "decoder_bias_triton_gemm"):
        decoder = result[name]  # cuBLAS / Triton GEMMs, without / with projection biases
        for key in ("logits", "hidden", "new_kv"):
            assert decoder[key] < TOLERANCE, result
        assert decoder["argmax_equal"], result
    assert result["backend_logits"] < TOLERANCE, result


def test_gemm_launches_parse_and_refuse_with_their_rule():
    """TREESPEC_FUSED_GEMMS overrides the Triton GEMMs' tiles for experiments; a bad value names the rule."""
    from treespec.plugins.fused.gemm import DEFAULT_LAUNCHES, GemmLaunch, parse_launches

    assert parse_launches("") == DEFAULT_LAUNCHES
    launches = parse_launches("down=16,32,3,8; o=64,16,1,4")
    assert launches["down"] == GemmLaunch(16, 32, 3, 8) and launches["o"] == GemmLaunch(64, 16, 1, 4)
    assert launches["qkv"] == DEFAULT_LAUNCHES["qkv"]
    for bad in ("down=16,32,3", "down=24,32,3,8", "attn=16,32,1,4", "lm_head=16,64,2,8", "down=16,32,0,4",
                "down=16,32,1,3"):
        with pytest.raises(ValueError, match="TREESPEC_FUSED_GEMMS"):
            parse_launches(bad)
    assert GemmLaunch(split_k=12).splits(64) < 12  # a tiny model's K never gets an empty split

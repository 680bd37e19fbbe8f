"""AOT compilation of the tree-attention kernel (no GPU needed) and its launch contract.

Checks that Triton compiles PTX + cubin for sm_80 and sm_90, that the PTX handed to TensorRT
declares exactly the arguments TensorRT passes (aot.KERNEL_ARGS), and that the TensorRT glue
(trt_plugin.aot_impl, run here against a stand-in `tensorrt.plugin` since TensorRT cannot be
installed) reports the same grid, block, shared memory and scalars as aot.plan_launch.
"""
from __future__ import annotations

import importlib
import random
import re
import sys
import types

import pytest

pytest.importorskip("triton")

from treespec.plugins.tree_attention import aot  # noqa: E402
from treespec.plugins.tree_attention.config import TACTICS, KernelConfig, tactic_config  # noqa: E402

BUILDS = [(80, "fp16", 64), (90, "fp16", 64), (90, "bf16", 128)]
PTX_TYPES = ["u64"] * 7 + ["u32"] * 4 + ["u64"]  # 7 input pointers, H KVH T C, output pointer


@pytest.fixture(scope="module")
def kernels():
    return {build: aot.fit_shared_memory(build[1], build[2], None, TACTICS[3], cc=build[0]) for build in BUILDS}


@pytest.mark.parametrize("build", BUILDS, ids=lambda b: f"sm{b[0]}-{b[1]}-d{b[2]}")
def test_ptx_and_cubin(kernels, build):
    cc, dtype, head_dim = build
    kernel = kernels[build]
    target = re.search(r"^\.target\s+(\S+)", kernel.ptx, re.M)
    assert target is not None and target.group(1).startswith(f"sm_{cc}")
    assert kernel.cubin[:4] == b"\x7fELF"
    assert kernel.name == "tree_attention_kernel" and kernel.dtype == dtype and kernel.head_dim == head_dim
    # The TensorRT PTX declares exactly KERNEL_ARGS, in order and with the right widths.
    decl = re.search(r"\.entry\s+" + kernel.name + r"\s*\((.*?)\)", kernel.trt_ptx, re.S).group(1)
    assert re.findall(r"\.param\s+\.(\w+)", decl) == PTX_TYPES
    assert len(aot.entry_params(kernel.ptx, kernel.name)) >= len(aot.KERNEL_ARGS)
    reqntid = re.search(r"\.reqntid\s+(\d+)", kernel.trt_ptx)
    assert reqntid is not None and int(reqntid.group(1)) == kernel.block[0] == kernel.num_warps * 32
    assert 0 < kernel.shared_mem <= aot.PORTABLE_SHARED_MEM
    # Nothing but the entry declaration changed.
    strip = lambda text: re.sub(r"\.entry[^)]*\)", "", text)  # noqa: E731
    assert strip(kernel.trt_ptx) == strip(kernel.ptx)


def test_launch_plan_covers_every_row(kernels):
    kernel = kernels[(90, "fp16", 64)]
    rng = random.Random(0)
    for _ in range(200):
        b, kvh, groups, t, c = rng.randint(1, 8), rng.randint(1, 8), rng.randint(1, 8), rng.randint(1, 300), rng.randint(0, 9000)
        h = kvh * groups
        shapes = [(b, h, t, 64), (b, kvh, t, 64), (b, kvh, t, 64), (b, kvh, c, 64), (b, kvh, c, 64), (b,), (b, t, t)]
        plan = aot.plan_launch(kernel, shapes)
        rows = groups * t
        assert (plan.grid[0] - 1) * kernel.config.block_m < rows <= plan.grid[0] * kernel.config.block_m
        assert plan.grid[1:] == (b * kvh, 1)
        assert plan.block == (kernel.num_warps * 32, 1, 1) and plan.shared_mem == kernel.shared_mem
        assert plan.scalars == (h, kvh, t, c)
    with pytest.raises(ValueError, match="head dim"):
        aot.plan_launch(kernel, [(1, 2, 3, 128)] + shapes[1:])


def test_strip_refuses_referenced_hidden_params():
    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n"
           "\tld.param.b64 %rd1, [k_param_0];\n\tld.param.b64 %rd2, [k_param_1];\n}\n")
    with pytest.raises(RuntimeError, match="k_param_1"):
        aot.strip_hidden_params(ptx, "k", 1)
    unused = ptx.replace("\tld.param.b64 %rd2, [k_param_1];\n", "")
    assert aot.entry_params(aot.strip_hidden_params(unused, "k", 1), "k") == ["k_param_0"]


def test_fit_shared_memory_lowered_the_stages(kernels):
    # Tactic 3 at head dim 128 needs more than 48 KiB with 3 stages on sm_90.
    kernel = kernels[(90, "bf16", 128)]
    assert kernel.config.num_stages < TACTICS[3].num_stages
    assert kernel.config.block_m == TACTICS[3].block_m and kernel.shared_mem <= aot.PORTABLE_SHARED_MEM
    with pytest.raises(RuntimeError, match="shared memory"):
        aot.fit_shared_memory("fp16", 64, None, KernelConfig(16, 16, 4, 1), cc=90, limit=1024)


# --- the TensorRT glue against a stand-in tensorrt.plugin -------------------------------------

class _Expr:
    """Constant symbolic dimension: enough of tensorrt.plugin.ShapeExpr for the glue."""

    def __init__(self, value):
        self.value, self.is_fake, self.is_constant = value, False, True

    def constant_value(self):
        return self.value

    def __mul__(self, other):
        return _Expr(self.value * _value(other))

    def __floordiv__(self, other):
        return _Expr(self.value // _value(other))


def _value(x):
    return x.value if isinstance(x, _Expr) else x


def _fake_tensorrt():
    trt = types.ModuleType("tensorrt")
    trt.float16, trt.bfloat16, trt.float32, trt.int32 = "HALF", "BF16", "FLOAT", "INT32"
    trt.DataType = str
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.registry = {}

    def decorator(kind):
        def outer(plugin_id):
            def inner(fn):
                trtp.registry[(kind, plugin_id)] = fn
                return fn
            return inner
        return outer

    trtp.register, trtp.autotune, trtp.aot_impl = decorator("register"), decorator("autotune"), decorator("aot_impl")

    class TensorDesc:
        def __init__(self, shape, dtype):
            self.shape_expr, self.dtype = [_Expr(d) for d in shape], dtype

        def like(self):
            return TensorDesc([e.value for e in self.shape_expr], self.dtype)

    class KernelLaunchParams:
        pass

    trtp.TensorDesc, trtp.KernelLaunchParams = TensorDesc, KernelLaunchParams
    trtp.SymInt32 = lambda v: ("i32", _value(v))
    trtp.SymIntExprs = types.SimpleNamespace(from_tuple=lambda seq: list(seq))
    trtp.AutoTuneCombination = lambda types_, layouts, tactics: (types_, layouts, tactics)
    trtp.cdiv = lambda a, b: _Expr(-(-_value(a) // _value(b)))
    trt.plugin = trtp
    return trt, trtp


def test_trt_glue_hands_tensorrt_the_aot_launch(monkeypatch, kernels):
    trt, trtp = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    name = "treespec.plugins.tree_attention.trt_plugin"
    sys.modules.pop(name, None)
    try:
        glue = importlib.import_module(name)
        compiled = {}

        def fit(dtype, head_dim, scale, config, cc=None):
            compiled["kernel"] = aot.fit_shared_memory(dtype, head_dim, scale, config, cc=90)
            return compiled["kernel"]

        monkeypatch.setattr(glue, "fit_shared_memory", fit)
        pid = "treespec::TreeAttention"
        assert {k for k, p in trtp.registry if p == pid} == {"register", "autotune", "aot_impl"}
        shapes = [(2, 9, 69, 64), (2, 3, 69, 64), (2, 3, 69, 64), (2, 3, 8192, 64), (2, 3, 8192, 64), (2,), (2, 69, 69)]
        dtypes = ["HALF"] * 5 + ["INT32", "INT32"]
        descs = [trtp.TensorDesc(s, d) for s, d in zip(shapes, dtypes)]
        out = trtp.registry[("register", pid)](*descs, 0.125)
        assert [e.value for e in out.shape_expr] == list(shapes[0]) and out.dtype == "HALF"
        io_types, layouts, tactics = trtp.registry[("autotune", pid)](*descs, (out,))[0]
        assert [t.strip() for t in io_types.split(",")][5:] == ["INT32", "INT32", "FP32|FP16|BF16"]
        assert layouts == "LINEAR" and tactics == sorted(TACTICS)

        assert tactic_config(0) == TACTICS[1]  # no custom tactic: the first one
        for tactic in (3,):  # compiled by the `kernels` fixture already (Triton's cache)
            name_, ptx, params, scalars = trtp.registry[("aot_impl", pid)](*descs, 0.125, (out,), tactic)
            kernel = compiled["kernel"]
            plan = aot.plan_launch(kernel, shapes)
            assert name_ == kernel.name and ptx == kernel.trt_ptx and kernel.scale == 0.125
            assert (_value(params.grid_x), _value(params.grid_y), _value(params.grid_z)) == plan.grid
            assert (params.block_x, params.block_y, params.block_z) == plan.block
            assert params.shared_mem == plan.shared_mem
            assert scalars == [("i32", v) for v in plan.scalars]
            assert kernel.config == TACTICS[tactic]
    finally:
        sys.modules.pop(name, None)

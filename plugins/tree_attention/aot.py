"""Ahead-of-time compilation of the tree-attention kernel to PTX, and its launch contract.

This module is the single source of truth for how `tree_attention_kernel` is launched outside
Triton's own launcher: the TensorRT plugin (trt_plugin.py) hands TensorRT exactly what
`compile_tree_attention` and `grid_dims`/`KERNEL_SCALARS` say, and the GPU test loads the same
PTX with the CUDA driver API and launches it with `plan_launch`.

Argument order (TensorRT's AOT convention): the 7 input pointers, the int32 scalars, the output
pointer. Triton >= 3.3 appends hidden pointer parameters (global and profile scratch) that its
own launcher fills with NULL; TensorRT passes only the arguments above, so `trt_ptx` drops those
parameters from the PTX entry after checking that the kernel body never reads them.
Works with the Triton 3.6 and 3.9 compiler APIs, with or without a GPU (pass `cc`).
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, TypeVar

from .config import KernelConfig

KERNEL_INPUTS = ("q", "k_new", "v_new", "past_k", "past_v", "past_lengths", "tree_mask")
KERNEL_OUTPUTS = ("out",)
# int32 scalars after the input pointers: (kernel name, input index, dimension) they come from.
KERNEL_SCALARS: tuple[tuple[str, int, int], ...] = (("H", 0, 1), ("KVH", 1, 1), ("T", 0, 2), ("C", 3, 2))
KERNEL_ARGS = KERNEL_INPUTS + tuple(name for name, _, _ in KERNEL_SCALARS) + KERNEL_OUTPUTS

_TRITON_TYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
_POINTER_NAMES = ("Q", "K_NEW", "V_NEW", "PAST_K", "PAST_V", "PAST_LEN", "TREE_MASK")


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str  # as Triton wrote it (with its hidden scratch parameters)
    trt_ptx: str  # entry parameters = KERNEL_ARGS exactly: what TensorRT launches
    cubin: bytes
    num_warps: int
    shared_mem: int  # dynamic shared memory per block, bytes
    arch: int  # compute capability, e.g. 90
    dtype: str  # fp16 | bf16 | fp32
    head_dim: int
    scale: float
    config: KernelConfig
    triton_version: str

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.num_warps * 32, 1, 1)


class SupportsDims(Protocol):
    def __mul__(self: _D, other: _D, /) -> _D: ...
    def __floordiv__(self: _D, other: _D, /) -> _D: ...


_D = TypeVar("_D", bound=SupportsDims)


def grid_dims(batch: _D, heads: _D, kv_heads: _D, tokens: _D, block_m: int,
              cdiv: Callable[[_D, int], _D]) -> tuple[_D, _D, int]:
    """Grid of `tree_attention_kernel`: (row blocks of one KV head, batch x KV heads, 1).
    Written once for ints and for TensorRT's symbolic shape expressions."""
    return cdiv(heads // kv_heads * tokens, block_m), batch * kv_heads, 1


def _int_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LaunchPlan:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    scalars: tuple[int, ...]  # values of KERNEL_SCALARS, in order


def plan_launch(kernel: CompiledKernel, input_shapes: Sequence[Sequence[int]]) -> LaunchPlan:
    """Launch of `kernel` for the shapes of the 7 inputs (KERNEL_INPUTS order)."""
    if len(input_shapes) != len(KERNEL_INPUTS):
        raise ValueError(f"expected {len(KERNEL_INPUTS)} input shapes, got {len(input_shapes)}")
    q = input_shapes[0]
    if q[3] != kernel.head_dim:
        raise ValueError(f"kernel was compiled for head dim {kernel.head_dim}, q has {q[3]}")
    grid = grid_dims(q[0], q[1], input_shapes[1][1], q[2], kernel.config.block_m, _int_cdiv)
    scalars = tuple(int(input_shapes[i][d]) for _, i, d in KERNEL_SCALARS)
    return LaunchPlan(grid=grid, block=kernel.block, shared_mem=kernel.shared_mem, scalars=scalars)


def triton_signature(dtype: str) -> dict[str, str]:
    element = "*" + _TRITON_TYPES[dtype]
    sig = {name: element for name in _POINTER_NAMES[:5]}
    sig.update(PAST_LEN="*i32", TREE_MASK="*i32")
    sig.update({name: "i32" for name, _, _ in KERNEL_SCALARS})
    sig["OUT"] = element
    sig.update({name: "constexpr" for name in ("SCALE", "D", "BLOCK_M", "BLOCK_N", "DOT_PREC")})
    return sig


def current_compute_capability() -> int:
    import triton

    target = triton.runtime.driver.active.get_current_target()
    return int(target.arch)


def compile_tree_attention(dtype: str, head_dim: int, scale: float | None, config: KernelConfig,
                           cc: int | None = None) -> CompiledKernel:
    """Compile `tree_attention_kernel` for one dtype/head dim/scale/tile config and compute
    capability `cc` (default: the current GPU). No GPU is needed when `cc` is given."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernel import tree_attention_kernel

    if dtype not in _TRITON_TYPES:
        raise ValueError(f"dtype must be one of {sorted(_TRITON_TYPES)}, got {dtype!r}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None or scale <= 0 else float(scale)
    cc = current_compute_capability() if cc is None else cc
    signature = triton_signature(dtype)
    constexprs = {"SCALE": scale, "D": head_dim, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                  "DOT_PREC": "ieee" if dtype == "fp32" else "tf32"}
    names = list(signature)
    # TensorRT and torch allocations are at least 256-byte aligned: let Triton vectorise loads.
    attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in (*_POINTER_NAMES, "OUT")}
    params = inspect.signature(ASTSource.__init__).parameters
    const_kw = "constexprs" if "constexprs" in params else "constants"
    src = ASTSource(fn=tree_attention_kernel, signature=signature, attrs=attrs, **{const_kw: constexprs})
    target = GPUTarget("cuda", cc, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": config.num_warps, "num_stages": config.num_stages,
                                     "enable_fp_fusion": True})
    compiled = triton.compile(src, target=target, options=options.__dict__)
    meta = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, scratch, 0):
            raise RuntimeError(f"kernel needs {scratch}={getattr(meta, scratch)}: TensorRT cannot provide it")
    ptx = compiled.asm["ptx"]
    return CompiledKernel(name=meta.name, ptx=ptx, trt_ptx=strip_hidden_params(ptx, meta.name, len(KERNEL_ARGS)),
                          cubin=bytes(compiled.asm["cubin"]), num_warps=meta.num_warps,
                          shared_mem=meta.shared, arch=cc, dtype=dtype, head_dim=head_dim,
                          scale=scale, config=config, triton_version=triton.__version__)


def entry_params(ptx: str, name: str) -> list[str]:
    """Parameter names of `.entry name(...)`."""
    match = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise ValueError(f"no .entry {name} in the PTX")
    return re.findall(r"\.param\b[^,]*?\s(\S+)\s*(?:,|$)", match.group(1).strip())


def strip_hidden_params(ptx: str, name: str, n_args: int) -> str:
    """Drop the entry parameters after the first `n_args` (Triton's scratch pointers), provided
    the kernel body never references them."""
    params = entry_params(ptx, name)
    if len(params) < n_args:
        raise ValueError(f"{name} has {len(params)} parameters, expected at least {n_args}")
    hidden = params[n_args:]
    if not hidden:
        return ptx
    for param in hidden:
        if len(re.findall(re.escape(param) + r"\b", ptx)) != 1:
            raise RuntimeError(f"{name} reads its hidden parameter {param}: cannot drop it")
    match = re.search(r"(\.entry\s+" + re.escape(name) + r"\s*\()(.*?)(\))", ptx, re.S)
    assert match is not None
    lines = [line for line in match.group(2).split("\n") if not any(re.search(re.escape(p) + r"\b", line)
                                                                     for p in hidden)]
    body = "\n".join(lines).rstrip()
    body = body[:-1] if body.endswith(",") else body
    return ptx[:match.start(2)] + body + "\n" + ptx[match.end(2):]


def describe(kernel: CompiledKernel) -> dict[str, Any]:
    return {"name": kernel.name, "arch": kernel.arch, "dtype": kernel.dtype, "head_dim": kernel.head_dim,
            "num_warps": kernel.num_warps, "shared_mem": kernel.shared_mem, "config": kernel.config.__dict__,
            "triton": kernel.triton_version, "ptx_params": len(entry_params(kernel.trt_ptx, kernel.name))}


# Dynamic shared memory above 48 KiB needs an opt-in (cuFuncSetAttribute) that TensorRT's
# documentation does not promise for AOT plugins, so kernels for TensorRT stay within it.
PORTABLE_SHARED_MEM = 48 * 1024


def fit_shared_memory(dtype: str, head_dim: int, scale: float | None, config: KernelConfig,
                      cc: int | None = None, limit: int = PORTABLE_SHARED_MEM) -> CompiledKernel:
    """Compile `config`, lowering num_stages and then block_n until shared memory fits `limit`."""
    while True:
        kernel = compile_tree_attention(dtype, head_dim, scale, config, cc)
        if kernel.shared_mem <= limit:
            return kernel
        if config.num_stages > 1:
            config = KernelConfig(config.block_m, config.block_n, config.num_warps, config.num_stages - 1)
        elif config.block_n > 16:
            config = KernelConfig(config.block_m, config.block_n // 2, config.num_warps, 2)
        else:
            raise RuntimeError(f"{config} needs {kernel.shared_mem} B of shared memory (limit {limit})")

"""Programmatic dependent launch (PDL) for the step's Triton kernels (issue 16).

Why: a SmolLM2 step is ~150-270 small dependent kernels; between two of them the GPU idles while
the next one launches and its first loads travel. A kernel launched with PDL starts while the one
before it ends, does whatever does not depend on it (a GEMM reads its weights) and then waits in
`gdc_wait` until that kernel's writes are visible. Captured into CUDA graphs as programmatic edges.
Hopper (compute capability 9.0) and newer, with a Triton that has `launch_pdl` (3.4+);
TREESPEC_FUSED_PDL=0 turns it off. A launch site takes `options = pdl_launch(device)` and passes
PDL=bool(options) (the kernel's constexpr: it calls gdc_launch_dependents and gdc_wait) and **options. Must stay in a .py file (Triton's
interpreter reads `pdl_start`'s source).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    from triton.backends.nvidia.compiler import CUDAOptions

    triton_has_it = hasattr(CUDAOptions, "launch_pdl") and hasattr(tl.extra.cuda, "gdc_wait")
    return triton_has_it and torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """PDL for kernels on `device`: CUDA on Hopper or newer, unless TREESPEC_FUSED_PDL=0."""
    if device.type != "cuda" or os.environ.get("TREESPEC_FUSED_PDL", "1") == "0":
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch(device: torch.device, wanted: bool = True) -> dict:
    """The launch option that lets a kernel start while the one before it ends ({}: a plain launch,
    when not `wanted` or the device cannot)."""
    return {"launch_pdl": True} if wanted and use_pdl(device) else {}


@triton.jit
def pdl_start(ENABLED: tl.constexpr):
    """At a kernel's start when it reads the previous kernel's output at once: let the next kernel
    launch, then wait for this one's inputs."""
    if ENABLED:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

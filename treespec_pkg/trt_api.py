"""Which TensorRT flavour is installed, and the few calls where TensorRT and TensorRT-RTX differ.

TensorRT-RTX's Python bindings mirror `tensorrt` class for class, so the exporter and the runtime
backend are written and type-checked against `tensorrt` alone (tensorrt-stubs). This module is the
one place that touches a flavour's module object: it imports `tensorrt`, `tensorrt_rtx` or
`tensorrt_rtx_bindings` dynamically (the RTX bindings ship no stubs, so the module is `Any` here)
and hands out objects annotated with the `tensorrt` types. Everything only one flavour has
(compute-capability targets, the runtime cache, RTX's own CUDA-graph capture, engine validity
checks, IAttention which tensorrt-stubs 10.13 predates) is a method of `TrtApi` below.

Engines are built through Polygraphy (`polygraphy.backend.trt`, and `polygraphy.backend.tensorrt_rtx`
for RTX's compute capabilities); `TrtApi.polygraphy()` binds Polygraphy to the installed flavour
(Polygraphy 0.53 drives TensorRT-RTX itself, but imports it as `tensorrt_rtx`, the name of NVIDIA's
own wheel, while the PyPI wheels install `tensorrt_rtx_bindings`).
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from treespec.errors import ArtifactError, BackendError, InputError
from treespec.files import write_atomic

if TYPE_CHECKING:
    import tensorrt as trt

BUILDERS = ("tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
_INSTALL = {
    "tensorrt": "pip install tensorrt (needs NVIDIA's package index and a GPU to build)",
    "tensorrt-rtx": "pip install tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116",
}
# The module name Polygraphy imports for each flavour (polygraphy.mod.trt_importer).
_POLYGRAPHY_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
# TensorRT-RTX's documented portable set when no compute capability is set (CPU-only AOT build).
RTX_DEFAULT_CCS = ["8.0", "8.6", "8.9", "12.0"]
_RTX_CC_NAMES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}
_SEVERITY_WARNING = 2  # ILogger.Severity: INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4


def normalize_cc(cc: str) -> str:
    """'sm_86', 'SM86', '86' and '8.6' all name compute capability '8.6'; 'current' stays."""
    text = cc.strip().lower().removeprefix("sm_").removeprefix("sm")
    if text == "current" or "." in text:
        return text
    if text.isdigit() and len(text) in (2, 3):
        return f"{text[:-1]}.{text[-1]}"
    raise InputError(f"'{cc}' is not a compute capability (write it as 8.6, sm_86 or current)")


@dataclass(frozen=True)
class TrtApi:
    builder: str  # "tensorrt" or "tensorrt-rtx": the name recorded in the manifest
    module: Any  # the imported flavour module; everything public below is typed as `tensorrt`
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.builder == "tensorrt-rtx"

    @classmethod
    def load(cls, builder: str) -> "TrtApi":
        if builder not in _MODULES:
            raise BackendError(f"unknown engine builder '{builder}' (use one of {', '.join(BUILDERS)})")
        for name in _MODULES[builder]:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            # tensorrt-stubs installs a bare `tensorrt/` folder, importable as an empty namespace.
            if hasattr(module, "Builder") and hasattr(module, "__version__"):
                return cls(builder=builder, module=module, version=str(module.__version__))
        raise BackendError(f"{builder} is not installed here ({_INSTALL[builder]})")

    # -- objects, typed as the tensorrt API -------------------------------------------------------

    def logger(self, sink: list[str]) -> "trt.ILogger":
        """A logger that keeps warnings and errors in `sink`, so failures can quote them."""
        base = self.module.ILogger

        def __init__(obj: Any) -> None:
            base.__init__(obj)

        def log(obj: Any, severity: Any, msg: str) -> None:
            if int(severity) <= _SEVERITY_WARNING:
                sink.append(msg.strip())

        logger: trt.ILogger = type("TreespecLogger", (base,), {"__init__": __init__, "log": log})()
        return logger

    def runtime(self, logger: "trt.ILogger") -> "trt.Runtime":
        runtime: trt.Runtime = self.module.Runtime(logger)
        return runtime

    @property
    def default_profiling_verbosity(self) -> "trt.ProfilingVerbosity":
        """TensorRT's own default (layer names only): Polygraphy's CreateConfig would ask for DETAILED."""
        verbosity: trt.ProfilingVerbosity = self.module.ProfilingVerbosity.LAYER_NAMES_ONLY
        return verbosity

    def progress_monitor(self, report: Callable[[str], None]) -> "trt.IProgressMonitor":
        """Forwards the builder's top two phase levels (and top-level steps) to `report`."""
        base = self.module.IProgressMonitor
        depth: dict[str, int] = {}
        totals: dict[str, int] = {}

        def __init__(obj: Any) -> None:
            base.__init__(obj)

        def phase_start(obj: Any, phase: str, parent: str | None, steps: int) -> None:
            depth[phase] = 0 if not parent else depth.get(parent, 0) + 1
            totals[phase] = int(steps)
            if depth[phase] <= 1:
                report(phase if depth[phase] == 0 else f"  {phase}")

        def step_complete(obj: Any, phase: str, step: int) -> bool:
            if depth.get(phase) == 0:
                report(f"{phase}: step {int(step) + 1}/{totals.get(phase, '?')}")
            return True

        def phase_finish(obj: Any, phase: str) -> None:
            depth.pop(phase, None)

        monitor: trt.IProgressMonitor = type("TreespecProgress", (base,), {
            "__init__": __init__, "phase_start": phase_start,
            "step_complete": step_complete, "phase_finish": phase_finish,
        })()
        return monitor

    # -- build-time differences ------------------------------------------------------------------

    def build_targets(self, ccs: list[str] | None) -> "BuildTargets":
        """Choose the GPUs the engine will run on: what the manifest records, and how Polygraphy sets it.

        TensorRT-RTX builds on the CPU for a list of compute capabilities (default: its portable
        set, left unset on the config; 'current' means the GPU present, and turns CPU-only AOT off).
        Full TensorRT builds for the GPU it runs on; 'ampere+' asks for its hardware-compatible
        (Ampere and later) engines.
        """
        if self.is_rtx:
            return self._rtx_targets(ccs)
        if not ccs:
            return BuildTargets(["current"])
        if [c.lower() for c in ccs] == ["ampere+"]:
            level = self.module.HardwareCompatibilityLevel.AMPERE_PLUS
            return BuildTargets(["ampere+"], {"hardware_compatibility_level": level})
        raise InputError(
            "full TensorRT builds for the GPU it runs on: leave compute capabilities unset, or ask "
            "for 'ampere+' (hardware-compatible engines for Ampere and later)"
        )

    def _rtx_targets(self, ccs: list[str] | None) -> "BuildTargets":
        if not ccs:
            return BuildTargets(list(RTX_DEFAULT_CCS))
        wanted = [normalize_cc(cc) for cc in ccs]
        if wanted == ["current"]:
            return BuildTargets(wanted, {"use_gpu": True})
        if "current" in wanted:
            raise InputError("compute capability 'current' cannot be combined with others")
        unknown = [cc for cc in wanted if cc not in _RTX_CC_NAMES]
        if unknown:
            raise InputError(
                f"TensorRT-RTX {self.version} cannot target compute capability {', '.join(unknown)} "
                f"(it supports {', '.join(_RTX_CC_NAMES)}, or 'current')"
            )
        pairs = [(int(major), int(minor)) for major, minor in (cc.split(".") for cc in wanted)]
        return BuildTargets(wanted, {"compute_capabilities": pairs})

    @property
    def has_attention(self) -> bool:
        """Whether the flavour has IAttention (TensorRT-RTX, TensorRT 10.14+): the ONNX parser maps
        opset-23 `Attention` to it, and Polygraphy's SetDecomposableAttentions marks it."""
        return hasattr(self.module.LayerType, "ATTENTION_INPUT") and hasattr(self.module, "IAttentionInputLayer")

    def decomposable_attentions(self, network: "trt.INetworkDefinition") -> int:
        """How many IAttention layers of `network` may fall back to MatMul/Softmax when the builder
        has no fused kernel for them (TensorRT-RTX refuses fp32 attention otherwise)."""
        if not self.has_attention:
            return 0
        count = 0
        for i in range(network.num_layers):
            layer: Any = network.get_layer(i)
            if layer.type == self.module.LayerType.ATTENTION_INPUT:
                layer.__class__ = self.module.IAttentionInputLayer  # the bindings return the ILayer base
                count += int(bool(layer.attention.decomposable))
        return count

    # -- Polygraphy, bound to this flavour -------------------------------------------------------

    def polygraphy(self) -> "PolygraphyTrt":
        """Polygraphy's TensorRT loaders, driving this flavour's module.

        Polygraphy picks its TensorRT module once per process, when `polygraphy.backend.trt` is
        first imported: `tensorrt`, or `tensorrt_rtx` when `polygraphy.config.USE_TENSORRT_RTX`
        is set (`polygraphy.mod.trt_importer.lazy_import_trt`). So the flag is set before that
        import, and the installed module is registered under the name Polygraphy imports. A
        process whose Polygraphy was already bound to the other flavour is refused.
        """
        try:
            config: Any = importlib.import_module("polygraphy.config")
        except ImportError:
            raise BackendError("Polygraphy is not installed here (pip install polygraphy)") from None
        if "polygraphy.backend.trt" not in sys.modules:
            config.USE_TENSORRT_RTX = self.is_rtx
        sys.modules.setdefault(_POLYGRAPHY_MODULES[self.builder], self.module)
        backend = importlib.import_module("polygraphy.backend.trt")
        bound = importlib.import_module("polygraphy.backend.trt.loader").trt
        if bool(config.USE_TENSORRT_RTX) != self.is_rtx or bound.Builder is not self.module.Builder:
            raise BackendError(
                f"Polygraphy is already bound to another TensorRT flavour in this process: build "
                f"{self.builder} engines in a process of their own"
            )
        create_config = backend.CreateConfig
        if self.is_rtx:
            create_config = importlib.import_module("polygraphy.backend.tensorrt_rtx").CreateConfigRTX
        return PolygraphyTrt(loaders=backend, create_config=create_config)

    # -- run-time differences --------------------------------------------------------------------

    def check_runs_here(self, runtime: "trt.Runtime", blob: bytes, made_by: str) -> None:
        """TensorRT-RTX can tell from an engine's header whether this GPU can run it."""
        if not self.is_rtx:
            return
        rtx_runtime: Any = runtime
        validity, diagnostics = rtx_runtime.get_engine_validity(blob)
        if validity == self.module.EngineValidity.INVALID:
            raise ArtifactError(
                f"{made_by} cannot run here: TensorRT-RTX finds no GPU it supports for it (diagnostics "
                f"flags {int(diagnostics)}). TensorRT-RTX runs on compute capability 7.5, 8.x and 12.x GPUs "
                "only (not 9.0/10.0): use --engines tensorrt or the onnxruntime backend on this machine"
            )

    def execution_context(self, engine: "trt.ICudaEngine", runtime_cache: "RuntimeCache | None",
                          cuda_graphs: bool, scratch: tuple[int, int] | None) -> "trt.IExecutionContext":
        """A new execution context.

        TensorRT: its activation memory is `scratch` (pointer, size), shared by all contexts of
        the backend since they never run at once on its single stream; this keeps one context per
        profile and per captured CUDA graph cheap. TensorRT-RTX: allocates its own, and gets the
        shared runtime cache and, with `cuda_graphs`, RTX's own graph capture.
        """
        context: trt.IExecutionContext | None
        if not self.is_rtx:
            strategy = self.module.ExecutionContextAllocationStrategy.USER_MANAGED
            context = engine.create_execution_context(strategy)
            if context is not None and scratch is not None:
                context.set_device_memory(scratch[0], scratch[1])
        else:
            rtx_engine: Any = engine
            config = rtx_engine.create_runtime_config()
            if runtime_cache is not None:
                config.set_runtime_cache(runtime_cache.cache)
            if cuda_graphs:
                config.cuda_graph_strategy = self.module.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            context = rtx_engine.create_execution_context(config)
        if context is None:
            raise BackendError(f"{self.builder} {self.version} could not create an execution context "
                               "(out of GPU memory?)")
        return context

    @property
    def uses_shared_scratch(self) -> bool:
        return not self.is_rtx

    def open_runtime_cache(self, engine: "trt.ICudaEngine", path: Path | None) -> "RuntimeCache | None":
        """TensorRT-RTX compiles kernels on first use; its runtime cache keeps them across runs."""
        if not self.is_rtx or path is None:
            return None
        rtx_engine: Any = engine
        cache = rtx_engine.create_runtime_config().create_runtime_cache()
        # A cache from another GPU, driver or RTX version is refused (False) and simply refilled.
        loaded = path.is_file() and bool(cache.deserialize(path.read_bytes()))
        return RuntimeCache(path=path, cache=cache, loaded=loaded)

    # cuda_graphs: full TensorRT is captured by the backend around execute_async_v3; TensorRT-RTX
    # captures itself (it JIT-compiles shape-specialised kernels, so its own capture knows when).
    @property
    def captures_cuda_graphs_itself(self) -> bool:
        return self.is_rtx


@dataclass(frozen=True)
class BuildTargets:
    recorded: list[str]  # the manifest's compute_capabilities
    config_args: dict[str, Any] = field(default_factory=dict)  # Polygraphy CreateConfig(RTX) keywords


@dataclass(frozen=True)
class PolygraphyTrt:
    loaders: Any  # polygraphy.backend.trt (untyped): network_from_onnx_path, engine_bytes_from_network, Profile...
    create_config: Any  # CreateConfig, or CreateConfigRTX (polygraphy.backend.tensorrt_rtx) for TensorRT-RTX


@dataclass
class RuntimeCache:
    path: Path
    cache: Any  # IRuntimeCache (TensorRT-RTX only)
    loaded: bool

    def save(self) -> None:
        write_atomic(self.path, memoryview(self.cache.serialize()))

"""Build TensorRT or TensorRT-RTX engines from the exported tree graphs, through Polygraphy, and record them.

    build_engines(artifact_dir: Path, manifest: dict, builder: str, precision: str | None = None,
                  compute_capabilities: list[str] | None = None,
                  progress: Callable[[str], None] | None = None,
                  graphs: Sequence[str] | None = None) -> dict

builds one engine per graph in `manifest["graphs"]` (or just `graphs`), writes
`<graph>.<builder>.engine` plus its JSON sidecar into `artifact_dir`, replaces that builder's record
in `graphs.<name>.engines` and returns the manifest (changed in place; writing manifest.json is the
caller's job). `build_artifact_engines(artifact_dir, builder, ...)` loads manifest.json and writes
it back through treespec.artifacts (load_manifest / write_manifest) and returns the typed Manifest:
one call for tests and scripts.

One engine is four steps: `parse_graph` (Polygraphy's NetworkFromOnnxPath, strongly typed, and
SetDecomposableAttentions), `configure` (CreateConfig / CreateConfigRTX: profiles, timing cache,
targets, progress), `build_plan` (EngineBytesFromNetwork) and `record_engine` (file, sidecar,
record). Polygraphy cannot save the plan: its SaveEngine wants a deserialized ICudaEngine, which
needs a GPU the flavour supports (none for RTX here), so the bytes are written atomically here.
Measured against the hand-written build it replaced (2-core CPU, RTX 1.7.1, 3 interleaved runs):
same sizes and records (SmolLM2 target 564,272,620 bytes), build times within the machine's noise.

- builder: "tensorrt" (needs a GPU; engines for that GPU, or 'ampere+') or "tensorrt-rtx" (builds
  on the CPU, ahead of time, for `compute_capabilities`: default its portable set 8.0/8.6/8.9/12.0,
  or e.g. ["8.6"], or ["current"] for the GPU present).
- precision: networks are strongly typed in both flavours (TensorRT-RTX has no other kind, and
  TensorRT 10.12+ deprecates weak typing), so an engine computes in the dtypes of its ONNX graph.
  `precision` is therefore a check: it must match the graph's dtype (fp32/fp16/bf16), or the graph
  must be re-exported. The record says `"precision_source": "onnx"`.
- opset-23 `Attention` nodes are marked decomposable (TensorRT-RTX refuses fp32 attention, and any
  shape without a fused kernel, otherwise).
- caches: TensorRT shares `timing.cache` across builds in the artifact dir; TensorRT-RTX tunes its
  kernels on the target GPU at run time, so its record names a `runtime_cache` file the runtime
  backend loads and refills.
- profiles come from each graph's manifest `profile` (see engine_profiles.py).
- profiling verbosity stays TensorRT's default (layer names only), not Polygraphy's (detailed).
"""
from __future__ import annotations

import logging
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from treespec.artifacts import Manifest, load_manifest, write_manifest
from treespec.engine_record import sha256_of, validate_record, write_sidecar
from treespec.errors import ArtifactError, InputError
from treespec.exporter.engine_profiles import EngineProfile, input_shapes, profiles_for_graph
from treespec.files import write_atomic
from treespec.trt_api import BUILDERS, BuildTargets, PolygraphyTrt, TrtApi

if TYPE_CHECKING:
    import tensorrt as trt

Progress = Callable[[str], None]
PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPE_PRECISION = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
TIMING_CACHE = "timing.cache"


def engine_file_name(graph: str, builder: str) -> str:
    return f"{graph}.{builder}.engine"


def build_engines(artifact_dir: Path, manifest: dict[str, Any], builder: str, precision: str | None = None,
                  compute_capabilities: list[str] | None = None, progress: Progress | None = None,
                  graphs: Sequence[str] | None = None) -> dict[str, Any]:
    if builder not in BUILDERS:
        raise InputError(f"--engines must be one of {', '.join(BUILDERS)} or none, got '{builder}'")
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    entries: dict[str, Any] = manifest.get("graphs", {})
    names = list(graphs) if graphs is not None else list(entries)
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise ArtifactError(f"the manifest has no graph {', '.join(unknown)} (it has {', '.join(entries) or 'none'})")
    api = TrtApi.load(builder)
    report = progress or (lambda _msg: None)
    for name in names:
        entry = entries[name]
        record = build_engine(api, artifact_dir, name, entry, precision, compute_capabilities, report)
        others = [r for r in entry.get("engines", []) if r.get("builder") != builder]
        entry["engines"] = others + [record]
    return manifest


def build_artifact_engines(artifact_dir: Path, builder: str = "tensorrt-rtx", precision: str | None = None,
                           compute_capabilities: list[str] | None = None, progress: Progress | None = None,
                           graphs: Sequence[str] | None = None) -> Manifest:
    """Build the engines of an artifact directory and record them in its manifest.json (read and
    written through treespec.artifacts, so the records are validated as the runtime reads them)."""
    manifest = load_manifest(artifact_dir)
    raw = manifest.to_dict()
    build_engines(manifest.root, raw, builder, precision, compute_capabilities, progress, graphs)
    built = Manifest.from_dict(raw, manifest.root)
    write_manifest(manifest.root, built)
    return built


@dataclass
class ParsedGraph:
    """A parsed, strongly typed network (the parser is kept: the network refers to its weights)."""
    builder: "trt.Builder"
    network: "trt.INetworkDefinition"
    parser: "trt.OnnxParser"
    precision: str
    decomposable: int


@dataclass(frozen=True)
class BuiltPlan:
    plan: memoryview  # the serialized engine (a view of TensorRT's IHostMemory: no copy of 0.5 GB)
    seconds: float


def build_engine(api: TrtApi, artifact_dir: Path, graph: str, entry: dict[str, Any], precision: str | None,
                 compute_capabilities: list[str] | None, report: Progress) -> dict[str, Any]:
    """Build one graph's engine; returns its record (also written as the engine's sidecar)."""
    onnx_path = _graph_onnx(api, artifact_dir, graph, entry)
    profiles = profiles_for_graph(graph, entry)
    targets = api.build_targets(compute_capabilities)
    poly = api.polygraphy()
    timing_cache = None if api.is_rtx else artifact_dir / TIMING_CACHE
    log: list[str] = []
    with polygraphy_log(log):
        report(f"{graph}: parsing {onnx_path.name}")
        parsed = parse_graph(api, poly, onnx_path, graph, entry, log)
        _check_precision(api, graph, parsed.precision, precision)
        config = configure(api, poly, parsed, profiles, targets, timing_cache, lambda msg: report(f"{graph}: {msg}"))
        report(f"{graph}: building with {api.builder} {api.version} ({parsed.precision}, "
               f"compute capabilities {', '.join(targets.recorded)})")
        built = build_plan(api, poly, parsed, config, timing_cache, graph, log)
    record = record_engine(api, artifact_dir, graph, entry, parsed, profiles, targets, built)
    report(f"{graph}: built {record['file']} in {built.seconds:.1f} s ({built.plan.nbytes / 1e6:.1f} MB)")
    return record


def _graph_onnx(api: TrtApi, artifact_dir: Path, graph: str, entry: dict[str, Any]) -> Path:
    onnx_path = artifact_dir / str(entry.get("onnx", ""))
    if not entry.get("onnx") or not onnx_path.is_file():
        raise ArtifactError(f"graph '{graph}': ONNX file '{entry.get('onnx')}' is missing from {artifact_dir}")
    if api.is_rtx and entry.get("attention") == "plugin":
        raise ArtifactError(
            f"graph '{graph}' was exported with --attention plugin, but TensorRT-RTX has no plugin API: "
            "build it with --engines tensorrt, or re-export with --attention decomposed or onnx"
        )
    return onnx_path


def parse_graph(api: TrtApi, poly: PolygraphyTrt, onnx_path: Path, graph: str, entry: dict[str, Any],
                log: list[str]) -> ParsedGraph:
    """Parse step: Polygraphy's NetworkFromOnnxPath (strongly typed), then SetDecomposableAttentions."""
    from polygraphy.exception import PolygraphyException  # polygraphy: optional ([tensorrt] extra)

    loader = poly.loaders.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    if api.has_attention:
        loader = poly.loaders.SetDecomposableAttentions(loader)
    try:
        builder, network, parser = loader()
    except PolygraphyException as exc:
        raise ArtifactError(f"{api.builder} {api.version} cannot parse {onnx_path.name}: "
                            + _builder_says(log, str(exc))) from None
    graph_precision = _network_precision(network, entry, graph)
    return ParsedGraph(builder, network, parser, graph_precision, api.decomposable_attentions(network))


def configure(api: TrtApi, poly: PolygraphyTrt, parsed: ParsedGraph, profiles: list[EngineProfile],
              targets: BuildTargets, timing_cache: Path | None, report: Progress) -> Any:
    """Configure step: a Polygraphy CreateConfig (CreateConfigRTX) loader; the build step calls it."""
    return poly.create_config(
        profiles=[_profile(poly, parsed.network, profile) for profile in profiles],
        load_timing_cache=str(timing_cache) if timing_cache is not None and timing_cache.is_file() else None,
        progress_monitor=api.progress_monitor(report),
        profiling_verbosity=api.default_profiling_verbosity,
        **targets.config_args,
    )


def _profile(poly: PolygraphyTrt, network: "trt.INetworkDefinition", profile: EngineProfile) -> Any:
    """A Polygraphy Profile: min/opt/max of every network input from the tree-graph contract."""
    shapes = poly.loaders.Profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tensor.shape
        low, opt, high = input_shapes(tensor.name, [shape[j] for j in range(len(shape))], profile)
        shapes.add(tensor.name, min=low, opt=opt, max=high)
    return shapes


def build_plan(api: TrtApi, poly: PolygraphyTrt, parsed: ParsedGraph, config: Any, timing_cache: Path | None,
               graph: str, log: list[str]) -> BuiltPlan:
    """Build step: Polygraphy's EngineBytesFromNetwork (which also merges the timing cache back)."""
    from polygraphy.exception import PolygraphyException  # polygraphy: optional ([tensorrt] extra)

    build = poly.loaders.EngineBytesFromNetwork(
        (parsed.builder, parsed.network), config=config,
        save_timing_cache=str(timing_cache) if timing_cache is not None else None)
    start = time.perf_counter()
    try:
        plan: trt.IHostMemory = build()
    except PolygraphyException as exc:
        raise ArtifactError(f"{api.builder} {api.version} could not build graph '{graph}': "
                            + _builder_says(log, str(exc))) from None
    return BuiltPlan(memoryview(plan), time.perf_counter() - start)


def record_engine(api: TrtApi, artifact_dir: Path, graph: str, entry: dict[str, Any], parsed: ParsedGraph,
                  profiles: list[EngineProfile], targets: BuildTargets, built: BuiltPlan) -> dict[str, Any]:
    """Record step: the engine file (written atomically), its record and its sidecar."""
    engine_name = engine_file_name(graph, api.builder)
    engine_path = write_atomic(artifact_dir / engine_name, built.plan)
    record: dict[str, Any] = {
        "file": engine_name,
        "builder": api.builder,
        "builder_version": api.version,
        "precision": parsed.precision,
        "precision_source": "onnx",
        "profiles": [p.to_dict() for p in profiles],
        "compute_capabilities": targets.recorded,
        "build_seconds": round(built.seconds, 3),
        "sha256": sha256_of(built.plan),
        "size_bytes": built.plan.nbytes,
        "onnx": entry["onnx"],
        "attention_decomposable": parsed.decomposable,
    }
    if api.is_rtx:
        record["runtime_cache"] = f"{graph}.{api.builder}.runtime-cache"
    else:
        record["timing_cache"] = TIMING_CACHE
    validate_record(record)
    write_sidecar(engine_path, record)
    return record


def _check_precision(api: TrtApi, graph: str, graph_precision: str, wanted: str | None) -> None:
    if wanted is not None and wanted != graph_precision:
        raise ArtifactError(
            f"graph '{graph}' is {graph_precision} (its ONNX dtypes) but {wanted} engines were asked: "
            f"{api.builder} networks are strongly typed, so re-export the graphs with --precision {wanted}"
        )


def _network_precision(network: "trt.INetworkDefinition", entry: dict[str, Any], graph: str) -> str:
    """The float dtype of the graph's inputs (KV cache or hidden states) is its precision."""
    found = set()
    for i in range(network.num_inputs):
        name = network.get_input(i).dtype.name
        if name in _DTYPE_PRECISION:
            found.add(_DTYPE_PRECISION[name])
    if len(found) > 1:
        raise ArtifactError(f"graph '{graph}' mixes float input dtypes {sorted(found)}")
    if found:
        return found.pop()
    return str(entry.get("precision", "fp32"))


# Polygraphy's own summary of a failure, logged after the builder's reasons.
_SUMMARIES = ("Could not parse ONNX correctly", "Failed to parse ONNX model", "Invalid Engine")


def _builder_says(log: list[str], fallback: str) -> str:
    """The last three distinct warnings/errors of the builder (TensorRT's logger and Polygraphy's
    parser check both report a parse error: once is enough)."""
    lines = [line for line in dict.fromkeys(log) if line and not line.startswith(_SUMMARIES)]
    return "; ".join(lines[-3:]) or fallback


class _SinkHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip()
        self.sink.append(_LETTER.sub("", text))


_LETTER = re.compile(r"^\[[A-Z!]\] ")  # Polygraphy's severity letter


@contextmanager
def polygraphy_log(sink: list[str]) -> Iterator[None]:
    """Polygraphy's warnings and errors (TensorRT's included: Polygraphy's TensorRT logger forwards
    them) go to `sink` instead of stdout while building, so a refusal can quote the builder."""
    from polygraphy.logger import G_LOGGER  # polygraphy: optional ([tensorrt] extra)

    python_logger = logging.getLogger("Polygraphy")
    handler = _SinkHandler(sink)
    kept = (G_LOGGER.use_python_logging_system, G_LOGGER.colors, python_logger.propagate)
    python_logger.addHandler(handler)
    python_logger.propagate = False
    G_LOGGER.use_python_logging_system, G_LOGGER.colors = True, False
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING), warnings.catch_warnings():
            # CreateConfig always sets an empty timing cache, a no-op TensorRT-RTX warns about.
            warnings.filterwarnings("ignore", "Use Deprecated in TensorRT-RTX", DeprecationWarning)
            yield
    finally:
        G_LOGGER.use_python_logging_system, G_LOGGER.colors, python_logger.propagate = kept
        python_logger.removeHandler(handler)

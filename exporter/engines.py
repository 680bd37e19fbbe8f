"""Build TensorRT or TensorRT-RTX engines from the exported tree graphs and record them.

    build_engines(artifact_dir: Path, manifest: dict, builder: str, precision: str | None = None,
                  compute_capabilities: list[str] | None = None,
                  progress: Callable[[str], None] | None = None,
                  graphs: Sequence[str] | None = None) -> dict

builds one engine per graph in `manifest["graphs"]` (or just `graphs`), writes
`<graph>.<builder>.engine` plus its JSON sidecar into `artifact_dir`, replaces that builder's record
in `graphs.<name>.engines` and returns the manifest (changed in place; writing manifest.json is the
caller's job). `build_artifact_engines(artifact_dir, builder, ...)` reads and writes manifest.json
itself: one call for tests and scripts.

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
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from treespec.exporter.engine_profiles import EngineProfile, input_shapes, profiles_for_graph
from treespec.engine_record import sha256_of, validate_record, write_sidecar
from treespec.trt_api import BUILDERS, TrtApi
from treespec.errors import ArtifactError, InputError

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
                           graphs: Sequence[str] | None = None) -> dict[str, Any]:
    """Read manifest.json, build the engines, write manifest.json back; returns the manifest."""
    path = Path(artifact_dir) / "manifest.json"
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    build_engines(Path(artifact_dir), manifest, builder, precision, compute_capabilities, progress, graphs)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return manifest


def build_engine(api: TrtApi, artifact_dir: Path, graph: str, entry: dict[str, Any], precision: str | None,
                 compute_capabilities: list[str] | None, report: Progress) -> dict[str, Any]:
    """Build one graph's engine; returns its record (also written as the engine's sidecar)."""
    onnx_path = artifact_dir / str(entry.get("onnx", ""))
    if not entry.get("onnx") or not onnx_path.is_file():
        raise ArtifactError(f"graph '{graph}': ONNX file '{entry.get('onnx')}' is missing from {artifact_dir}")
    if api.is_rtx and entry.get("attention") == "plugin":
        raise ArtifactError(
            f"graph '{graph}' was exported with --attention plugin, but TensorRT-RTX has no plugin API: "
            "build it with --engines tensorrt, or re-export with --attention decomposed or onnx"
        )
    profiles = profiles_for_graph(graph, entry)
    log: list[str] = []
    logger = api.logger(log)
    builder = api.builder_for(logger)
    network = api.strongly_typed_network(builder)
    parser = api.onnx_parser(network, logger)
    report(f"{graph}: parsing {onnx_path.name}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or log[-3:]
        raise ArtifactError(f"{api.builder} {api.version} cannot parse {onnx_path.name}: " + "; ".join(errors))
    graph_precision = _network_precision(network, entry, graph)
    if precision is not None and precision != graph_precision:
        raise ArtifactError(
            f"graph '{graph}' is {graph_precision} (its ONNX dtypes) but {precision} engines were asked: "
            f"{api.builder} networks are strongly typed, so re-export the graphs with --precision {precision}"
        )
    decomposable = api.mark_attention_decomposable(network)

    config = builder.create_builder_config()
    for profile in profiles:
        _add_profile(api, builder, config, network, profile)
    targets = api.set_targets(config, compute_capabilities)
    cache_path = artifact_dir / TIMING_CACHE
    if not api.is_rtx:
        _load_timing_cache(config, cache_path)
    config.progress_monitor = api.progress_monitor(lambda msg: report(f"{graph}: {msg}"))

    report(f"{graph}: building with {api.builder} {api.version} ({graph_precision}, "
           f"compute capabilities {', '.join(targets)})")
    start = time.perf_counter()
    serialized: trt.IHostMemory | None = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        errors = [line for line in log if line][-3:]
        raise ArtifactError(f"{api.builder} {api.version} could not build graph '{graph}': "
                            + ("; ".join(errors) or "no message from the builder"))
    if not api.is_rtx:
        _save_timing_cache(config, cache_path)

    engine_name = engine_file_name(graph, api.builder)
    engine_path = artifact_dir / engine_name
    blob = memoryview(serialized)
    tmp = engine_path.with_name(engine_name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(engine_path)
    record: dict[str, Any] = {
        "file": engine_name,
        "builder": api.builder,
        "builder_version": api.version,
        "precision": graph_precision,
        "precision_source": "onnx",
        "profiles": [p.to_dict() for p in profiles],
        "compute_capabilities": targets,
        "build_seconds": round(seconds, 3),
        "sha256": sha256_of(blob),
        "size_bytes": blob.nbytes,
        "onnx": entry["onnx"],
        "attention_decomposable": decomposable,
    }
    if api.is_rtx:
        record["runtime_cache"] = f"{graph}.{api.builder}.runtime-cache"
    else:
        record["timing_cache"] = TIMING_CACHE
    validate_record(record)
    write_sidecar(engine_path, record)
    report(f"{graph}: built {engine_name} in {seconds:.1f} s ({blob.nbytes / 1e6:.1f} MB)")
    return record


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


def _add_profile(api: TrtApi, builder: "trt.Builder", config: "trt.IBuilderConfig",
                 network: "trt.INetworkDefinition", profile: EngineProfile) -> None:
    shapes = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tensor.shape
        low, opt, high = input_shapes(tensor.name, [shape[j] for j in range(len(shape))], profile)
        shapes.set_shape(tensor.name, api.dims(low), api.dims(opt), api.dims(high))
    if config.add_optimization_profile(shapes) < 0:
        raise ArtifactError(f"the builder refused optimisation profile '{profile.name}' {profile.to_dict()}")


def _load_timing_cache(config: "trt.IBuilderConfig", path: Path) -> None:
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False):  # from another GPU or version: start afresh
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: "trt.IBuilderConfig", path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    tmp.replace(path)

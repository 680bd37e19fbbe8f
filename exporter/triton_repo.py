"""Write a Triton Inference Server model repository for an artifact directory.

    <repo>/treespec_repo.json         what wrote the repository (compared on reuse)
    <repo>/treespec/config.pbtxt      the orchestrator: python backend, decoupled (streaming)
    <repo>/treespec/1/model.py        runtime/triton/repo_model.py, copied: puts this environment on
                                      the stub's sys.path, then runs treespec.runtime.triton.model
    <repo>/target|draft|medusa/       one model per graph: platform onnxruntime_onnx, or
                                      tensorrt_plan when the manifest records full-TensorRT engines,
                                      files linked (or copied) from the artifact directory, for
                                      users who prefer BLS or ensembles over the orchestrator

Every config.pbtxt is built as a `ModelConfig` protobuf (the one tritonclient ships) and printed
with text_format, so it parses by construction. The orchestrator reads the draft -> tree -> verify
loop's graphs or engines from the artifact directory (absolute path in its parameters) with the
backend named in its parameters; its device follows its instance group (KIND_CPU / KIND_GPU).
Writing is deterministic: writing the same artifacts with the same options again changes nothing,
which is what lets `treespec serve` reuse a repository unchanged across restarts.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import site
from importlib import resources
from pathlib import Path
from typing import Any

import treespec
from treespec.errors import ArtifactError, InputError
from treespec.artifacts import EngineRecord, GraphEntry, load_manifest

STAMP = "treespec_repo.json"
ORCHESTRATOR = "treespec"
GRAPHS = ("target", "draft", "medusa")
BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx", "torch")  # torch: the artifacts' torch_weights
DEVICES = ("cpu", "cuda")
TREE_SIZING = ("load", "fixed")  # batched greedy trees: sized per step for the load, or as configured
DEFAULT_MAX_TOKENS = 128

# name, Triton type, dims, optional: Triton's LLM conventions (the generate endpoints map JSON
# fields onto these) plus the token interface and treespec's own knobs.
ORCHESTRATOR_INPUTS = [
    ("text_input", "TYPE_STRING", [1], True),
    ("input_ids", "TYPE_INT64", [-1], True),
    ("messages", "TYPE_STRING", [1], True),  # chat messages as JSON text (the OpenAI front's chat)
    ("max_tokens", "TYPE_INT32", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("top_k", "TYPE_INT32", [1], True),
    ("seed", "TYPE_INT64", [1], True),
    ("stream", "TYPE_BOOL", [1], True),
    ("tree", "TYPE_STRING", [1], True),
    ("raw", "TYPE_BOOL", [1], True),
    ("timeout", "TYPE_FP32", [1], True),  # seconds the request may hold the model
]
ORCHESTRATOR_OUTPUTS = [
    ("text_output", "TYPE_STRING", [-1]),
    ("output_ids", "TYPE_INT64", [-1]),
    ("accepted_tokens", "TYPE_INT32", [1]),
    ("steps", "TYPE_INT32", [1]),
    ("prompt_tokens", "TYPE_INT32", [1]),  # the prompt's length in tokens (OpenAI usage)
]

# ONNX TensorProto element type -> Triton data type
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32",
                  7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}

# The model.py that Triton loads is a real module of the runtime, shipped in the package and copied
# into the repository as a data file (read here, never imported: the exporter stays off the runtime).
MODEL_PY_PACKAGE, MODEL_PY_FILE = "treespec.runtime.triton", "repo_model.py"


def model_py() -> str:
    """The text of <repo>/treespec/1/model.py (runtime/triton/repo_model.py)."""
    return resources.files(MODEL_PY_PACKAGE).joinpath(MODEL_PY_FILE).read_text()


def _pb():
    try:
        from google.protobuf import text_format
    except ImportError as exc:
        raise InputError(f"writing a Triton repository needs protobuf (pip install protobuf): {exc}") from None
    return _model_config_pb2(), text_format


def _model_config_pb2():
    """tritonclient's ModelConfig protobuf module. Its package imports grpc first; where grpcio is
    missing (the GPU machine's carried wheels) the module file, which needs protobuf only, is loaded alone."""
    try:
        from tritonclient.grpc import model_config_pb2
        return model_config_pb2
    except (ImportError, RuntimeError) as exc:  # tritonclient.grpc raises RuntimeError without grpcio
        spec = importlib.util.find_spec("tritonclient")
        path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py" if spec else None
        if path is None or not path.is_file():
            raise InputError(f"writing a Triton repository needs tritonclient (pip install 'tritonclient[grpc]'): "
                             f"{exc}") from None
        module_spec = importlib.util.spec_from_file_location("treespec_model_config_pb2", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module


def python_path() -> list[str]:
    """This environment's package folders for the stub's sys.path: the folders of PYTHONPATH (how
    the GPU machine's carried wheels and an uninstalled treespec are found: tools/gpu_env.sh), its
    site-packages (and the user site, when enabled). Deliberately not sys.path, which depends on
    how the writer was started (pytest, the cwd): the same environment must give the same repository."""
    out = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.isdir(p)]
    out += [p for p in site.getsitepackages() if os.path.isdir(p) and p not in out]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        out.append(site.getusersitepackages())
    return out


def _treespec_root() -> str:
    return str(Path(treespec.__file__).resolve().parent)


def _tensor(pb, kind: str, name: str, dtype: str, dims: list[int], optional: bool = False):
    cls = pb.ModelInput if kind == "input" else pb.ModelOutput
    t = cls(name=name, data_type=pb.DataType.Value(dtype), dims=dims)
    if optional:
        t.optional = True
    return t


def _instance_group(pb, device: str, count: int, gpu: int | None = None):
    kind = pb.ModelInstanceGroup.KIND_GPU if device == "cuda" else pb.ModelInstanceGroup.KIND_CPU
    group = pb.ModelInstanceGroup(kind=kind, count=count)
    if gpu is not None:
        group.gpus.append(gpu)
    return group


def check_gpus(gpus, device: str) -> tuple[int, ...]:
    """GPU ids for one instance group each (issue 18); () leaves the placement to Triton (one group)."""
    gpus = tuple(gpus or ())
    if gpus and device != "cuda":
        raise InputError("gpus needs device cuda: instance groups on GPUs (KIND_GPU)")
    if any(isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < 1024 for g in gpus) or len(set(gpus)) < len(gpus):
        raise InputError(f"gpus must be distinct GPU ids in [0, 1024), got {list(gpus)!r}")
    return gpus


def orchestrator_config(artifact_dir: Path, backend: str, device: str, instances: int = 1,
                        threads: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                        drafter: str | None = None, tree: str | None = None, batch_slots: int = 0,
                        tree_sizing: str = "load", gpus: tuple[int, ...] = ()):
    """The orchestrator's config. `gpus`: one KIND_GPU instance group per id, each of `instances`
    instances (Triton spreads requests over them; each has its own KV cache and batch)."""
    pb, _ = _pb()
    cfg = pb.ModelConfig(name=ORCHESTRATOR, backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    cfg.input.extend(_tensor(pb, "input", n, t, d, o) for n, t, d, o in ORCHESTRATOR_INPUTS)
    cfg.output.extend(_tensor(pb, "output", n, t, d) for n, t, d in ORCHESTRATOR_OUTPUTS)
    if gpus:
        cfg.instance_group.extend(_instance_group(pb, device, instances, gpu) for gpu in gpus)
    else:
        cfg.instance_group.append(_instance_group(pb, device, instances))
    params = {
        "artifact_dir": str(artifact_dir),
        "backend": backend,
        "threads": str(threads or 0),
        "drafter": drafter or "",  # empty: the manifest's default drafter
        "tree": tree or "",  # empty: that drafter's default tree; requests may override it
        "default_max_tokens": str(max_tokens),
        "batch_slots": str(batch_slots),  # > 0: in-flight batching over that many slots (runtime/batching.py)
        "tree_sizing": tree_sizing,  # load: batched trees sized per step for the load (runtime/batch_sizing.py)
        "python_path": json.dumps(python_path()),
        "treespec_root": _treespec_root(),
    }
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def _onnx_io(path: Path) -> tuple[list, list]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a truncated or foreign file
        raise ArtifactError(f"cannot read {path.name} to describe its inputs/outputs: {exc}") from None

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in ONNX_TO_TRITON:
                raise ArtifactError(f"{path.name}: {v.name} has ONNX type {t.elem_type}, which Triton cannot serve")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append((v.name, ONNX_TO_TRITON[t.elem_type], dims))
        return out

    inits = {i.name for i in model.graph.initializer}
    return describe([v for v in model.graph.input if v.name not in inits]), describe(model.graph.output)


def _trt_engine(entry: GraphEntry) -> EngineRecord | None:
    return entry.engine("tensorrt")


def _check_engine(engine: EngineRecord | None, backend: str, artifact_dir: Path, batch_slots: int) -> None:
    """The target's engine for a TensorRT backend exists and its profiles hold the batch slots (ONNX
    Runtime and torch take any batch)."""
    kind = "full-TensorRT" if backend == "tensorrt" else "TensorRT-RTX"
    if engine is None:
        raise ArtifactError(f"{artifact_dir} has no {kind} engine for the target graph: build one with "
                            f"treespec-export --engines {backend}, or use --backend onnxruntime")
    most = max((p.batch[2] for p in engine.profiles), default=1)
    if batch_slots > most:
        raise InputError(f"batch_slots {batch_slots} is over what the target's {kind} engine holds (batch "
                         f"{most} at most): re-export with treespec-export --max-batch {batch_slots}, or "
                         f"serve --batch-slots {most}")


def graph_config(manifest, name: str, device: str):
    """(ModelConfig, {file in version dir: source path}) for one graph of the artifacts."""
    pb, _ = _pb()
    entry = manifest.graph(name)
    onnx_path = manifest.require_file(entry.onnx)
    inputs, outputs = _onnx_io(onnx_path)
    engine = _trt_engine(entry)
    cfg = pb.ModelConfig(name=name, max_batch_size=0)
    files: dict[str, Path] = {}
    if engine is not None:
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
        files["model.plan"] = manifest.require_file(engine.file)
        device = "cuda"  # TensorRT plans run on GPUs only
    else:
        cfg.platform = "onnxruntime_onnx"
        cfg.default_model_filename = "model.onnx"
        files["model.onnx"] = onnx_path
        if entry.external_data:  # ONNX Runtime finds it by the name stored in the graph
            data = manifest.require_file(entry.onnx + ".data")
            files[data.name] = data
    cfg.input.extend(_tensor(pb, "input", n, t, d) for n, t, d in inputs)
    cfg.output.extend(_tensor(pb, "output", n, t, d) for n, t, d in outputs)
    group = _instance_group(pb, device, 1)
    if engine is not None and len(engine.profiles) > 1:
        # e.g. "tree" and "prefill": Triton runs each request in the first listed profile it fits
        group.profile.extend(str(i) for i in range(len(engine.profiles)))
    cfg.instance_group.append(group)
    return cfg, files


def config_text(cfg) -> str:
    _, text_format = _pb()
    return text_format.MessageToString(cfg)


def parse_config(text: str):
    """Parse a config.pbtxt with tritonclient's ModelConfig protobuf (raises on any error)."""
    pb, text_format = _pb()
    return text_format.Parse(text, pb.ModelConfig())


def _manifest_digest(artifact_dir: Path) -> str:
    return hashlib.sha256((artifact_dir / "manifest.json").read_bytes()).hexdigest()


def plan_repo(artifact_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu",
              instances: int = 1, threads: int | None = None, graphs: bool = True,
              link: str = "symlink", drafter: str | None = None, tree: str | None = None,
              batch_slots: int = 0, tree_sizing: str = "load", gpus: tuple[int, ...] = ()) -> dict[str, str | Path]:
    """Everything the repository holds: relative path -> text, or -> a source file to link/copy."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    if device not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)}, got '{device}'")
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise InputError(f"instances must be a positive integer, got {instances!r}")
    if isinstance(batch_slots, bool) or not isinstance(batch_slots, int) or not 0 <= batch_slots <= 256:
        raise InputError(f"batch_slots must be an integer in [0, 256], got {batch_slots!r}")
    gpus = check_gpus(gpus, device)
    if tree_sizing not in TREE_SIZING:
        raise InputError(f"tree_sizing must be one of {', '.join(TREE_SIZING)}, got '{tree_sizing}'")
    if link not in ("symlink", "copy"):
        raise InputError(f"link must be 'symlink' or 'copy', got '{link}'")
    artifact_dir = Path(artifact_dir).resolve()
    manifest = load_manifest(artifact_dir)
    if backend.startswith("tensorrt"):
        _check_engine(manifest.graph("target").engine(backend), backend, artifact_dir, batch_slots)
    if backend == "torch" and manifest.torch_weights is None:
        raise ArtifactError(f"{artifact_dir} has no torch_weights for the torch backend: re-export the artifacts "
                            "with treespec-export, or use --backend onnxruntime")
    plan: dict[str, str | Path] = {}
    if drafter is not None and drafter != "none" and drafter not in manifest.drafters:
        raise ArtifactError(f"these artifacts have no '{drafter}' drafter (they have: "
                            f"{', '.join(manifest.drafters) or 'none'})")
    cfg = orchestrator_config(artifact_dir, backend, device, instances, threads, drafter=drafter, tree=tree,
                              batch_slots=batch_slots, tree_sizing=tree_sizing, gpus=gpus)
    plan[f"{ORCHESTRATOR}/config.pbtxt"] = config_text(cfg)
    plan[f"{ORCHESTRATOR}/1/model.py"] = model_py()
    if graphs:
        for name in GRAPHS:
            if name not in manifest.graphs:
                continue
            gcfg, files = graph_config(manifest, name, device)
            plan[f"{name}/config.pbtxt"] = config_text(gcfg)
            for fname, src in files.items():
                plan[f"{name}/1/{fname}"] = src
    stamp = {"treespec_version": _version(), "artifact_dir": str(artifact_dir),
             "manifest_sha256": _manifest_digest(artifact_dir), "backend": backend, "device": device,
             "instances": instances, "threads": threads, "link": link, "drafter": drafter, "tree": tree,
             "batch_slots": batch_slots, "tree_sizing": tree_sizing, "gpus": list(gpus), "models": sorted({k.split("/")[0] for k in plan})}
    plan[STAMP] = json.dumps(stamp, indent=2) + "\n"
    return plan


def _version() -> str:
    return treespec.__version__


def _matches(out_dir: Path, plan: dict[str, str | Path], link: str) -> bool:
    """True when out_dir holds exactly the planned files (nothing else)."""
    present = {str(p.relative_to(out_dir)) for p in out_dir.rglob("*")
               if (p.is_file() or p.is_symlink()) and "__pycache__" not in p.parts}
    if present != set(plan):
        return False
    for rel, content in plan.items():
        path = out_dir / rel
        if isinstance(content, str):
            if path.is_symlink() or path.read_text() != content:
                return False
        elif link == "symlink":
            if not path.is_symlink() or Path(os.readlink(path)) != content:
                return False
        elif path.is_symlink() or path.stat().st_size != content.stat().st_size:
            return False
    return True


def write_triton_repo(artifact_dir: str | Path, out_dir: str | Path, backend: str = "onnxruntime",
                      device: str = "cpu", force: bool = False, instances: int = 1,
                      threads: int | None = None, graphs: bool = True, link: str = "symlink",
                      drafter: str | None = None, tree: str | None = None, batch_slots: int = 0,
                      tree_sizing: str = "load", gpus: tuple[int, ...] = ()) -> Path:
    """Write the model repository for `artifact_dir` into `out_dir` and return out_dir.

    backend: how the orchestrator runs the graphs (onnxruntime, tensorrt, tensorrt-rtx, torch); device:
    cpu or cuda (the instance group's kind); instances: orchestrator processes (per GPU with `gpus`:
    one KIND_GPU instance group per GPU id); threads: ONNX
    Runtime threads per instance (0/None: its default); drafter / tree: the orchestrator's drafter
    and default tree (None: the manifest's); batch_slots: > 0 batches requests in flight over that
    many slots (0: one request after the other); graphs: also write the per-graph models;
    link: 'symlink' the graph files from the artifacts or 'copy' them. An out_dir that already
    holds exactly this repository is left untouched; any other non-empty out_dir needs force.
    """
    out_dir = Path(out_dir)
    plan = plan_repo(artifact_dir, backend, device, instances, threads, graphs, link, drafter, tree, batch_slots,
                     tree_sizing, gpus)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if _matches(out_dir, plan, link):
            return out_dir
        if not force:
            raise InputError(f"--out {out_dir} is not empty: choose another directory or pass --force to replace it")
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, content in sorted(plan.items()):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                path.write_text(content)
            elif link == "symlink":
                path.symlink_to(content)
            else:
                shutil.copyfile(content, path)
        if out_dir.exists():
            out_dir.rmdir()
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_stamp(repo_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(repo_dir) / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def ensure_triton_repo(artifact_dir: str | Path, repo_dir: str | Path, backend: str = "onnxruntime",
                       device: str = "cpu", instances: int = 1, threads: int | None = None,
                       drafter: str | None = None, tree: str | None = None, batch_slots: int = 0,
                       tree_sizing: str = "load", gpus: tuple[int, ...] = ()) -> bool:
    """Reuse repo_dir when it already is this repository (returns True), else (re)write it.

    A folder that treespec wrote for other artifacts or options is rewritten; a non-empty folder
    that treespec did not write is refused.
    """
    repo_dir = Path(repo_dir)
    plan = plan_repo(artifact_dir, backend, device, instances, threads, drafter=drafter, tree=tree,
                     batch_slots=batch_slots, tree_sizing=tree_sizing, gpus=gpus)
    if repo_dir.is_dir() and any(repo_dir.iterdir()) and _matches(repo_dir, plan, "symlink"):
        return True
    ours = read_stamp(repo_dir) is not None
    write_triton_repo(artifact_dir, repo_dir, backend, device, force=ours, instances=instances, threads=threads,
                      drafter=drafter, tree=tree, batch_slots=batch_slots, tree_sizing=tree_sizing, gpus=gpus)
    return False


def cache_root() -> Path:
    """$TREESPEC_CACHE, else $XDG_CACHE_HOME/treespec or ~/.cache/treespec."""
    return Path(os.environ.get("TREESPEC_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "treespec")


def default_repo_dir(artifact_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu") -> Path:
    """A per-artifacts cache folder: <cache_root>/triton/<name>-<hash of path, backend, device>."""
    artifact_dir = Path(artifact_dir).resolve()
    root = cache_root()
    key = hashlib.sha256(f"{artifact_dir}|{backend}|{device}".encode()).hexdigest()[:12]
    return root / "triton" / f"{artifact_dir.name}-{key}"

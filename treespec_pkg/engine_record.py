"""Engine records, and the check that refuses a corrupt or mismatched engine before TensorRT sees it.

Each engine file has a record, kept in the manifest (`graphs.<name>.engines[]`) and in a JSON
sidecar next to the file (`<engine>.json`, so a lone engine still says where it came from):

    file, builder ("tensorrt" | "tensorrt-rtx"), builder_version, precision, profiles,
    compute_capabilities, build_seconds, sha256, size_bytes  (+ informational extras)

TensorRT engines load only in the TensorRT (flavour and version) that built them, and a truncated
file can crash or hang a deserializer instead of failing cleanly, so `check_engine` compares size,
SHA-256, builder and version first and names the builder and version that made the engine in every
refusal. With `deserialize=True` (needs a GPU) it also asks TensorRT to load the engine.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from treespec.errors import ArtifactError, BackendError
from treespec.files import read_json_object, write_json
from treespec.trt_api import TrtApi

if TYPE_CHECKING:
    import tensorrt as trt

RECORD_KEYS = ("file", "builder", "builder_version", "precision", "profiles", "compute_capabilities",
               "build_seconds", "sha256", "size_bytes")


def sha256_of(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def write_sidecar(engine_path: Path, record: Mapping[str, Any]) -> Path:
    return write_json(sidecar_path(engine_path), dict(record))


def read_sidecar(engine_path: Path) -> dict[str, Any]:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise ArtifactError(
            f"engine {engine_path.name} has no record (neither a manifest entry nor {path.name}), so "
            "nothing says which TensorRT built it: rebuild it with treespec-export --engines ..."
        )
    return read_json_object(path, path.name)


def made_by(record: Mapping[str, Any]) -> str:
    return f"engine {record.get('file', '?')} (built by {record.get('builder', '?')} {record.get('builder_version', '?')})"


def _rebuild_hint(record: Mapping[str, Any]) -> str:
    return f"rebuild it with treespec-export --engines {record.get('builder', 'tensorrt-rtx')}"


def validate_record(record: Mapping[str, Any]) -> None:
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise ArtifactError(f"the record of {made_by(record)} lacks {', '.join(missing)}: {_rebuild_hint(record)}")


def check_engine(path: Path, record: Mapping[str, Any] | None = None, *, api: TrtApi | None = None,
                 deserialize: bool = False) -> bytes:
    """Return the engine's bytes if it is intact and the installed TensorRT can load it.

    Raises ArtifactError naming the builder and version that made the engine when the file is
    missing, truncated or altered (size or SHA-256 differ from the record), when that builder is
    not installed or is another version, or (with `deserialize`) when TensorRT cannot load it.
    """
    record = read_sidecar(path) if record is None else record
    validate_record(record)
    origin = made_by(record)
    if not path.is_file():
        raise ArtifactError(f"{origin} is missing from {path.parent}: {_rebuild_hint(record)}")
    size = path.stat().st_size
    if size != int(record["size_bytes"]):
        raise ArtifactError(
            f"{origin} is corrupt: it has {size} bytes but {record['builder']} wrote "
            f"{record['size_bytes']} (truncated or overwritten): {_rebuild_hint(record)}"
        )
    blob = path.read_bytes()
    if sha256_of(blob) != record["sha256"]:
        raise ArtifactError(f"{origin} is corrupt: its SHA-256 differs from the record: {_rebuild_hint(record)}")
    api = api if api is not None else _installed(record, origin)
    if api.builder != record["builder"] or api.version != record["builder_version"]:
        raise ArtifactError(
            f"{origin} cannot be loaded by the installed {api.builder} {api.version}: TensorRT engines "
            f"load only in the builder and version that made them. Install {record['builder']} "
            f"{record['builder_version']}, or {_rebuild_hint(record)}"
        )
    if deserialize:
        deserialize_engine(api, blob, record)
    return blob


def _installed(record: Mapping[str, Any], origin: str) -> TrtApi:
    try:
        return TrtApi.load(str(record["builder"]))
    except BackendError as exc:
        raise ArtifactError(f"{origin} cannot be loaded: {exc}") from None


def deserialize_engine(api: TrtApi, blob: bytes, record: Mapping[str, Any]) -> tuple["trt.Runtime", "trt.ICudaEngine"]:
    """Deserialize a checked engine; the runtime is returned too since the engine must not outlive it."""
    log: list[str] = []
    runtime = api.runtime(api.logger(log))
    origin = made_by(record)
    api.check_runs_here(runtime, blob, origin)
    engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        detail = log[-1] if log else "no message from TensorRT"
        raise ArtifactError(f"{origin} could not be deserialized by {api.builder} {api.version}: {detail}")
    return runtime, engine

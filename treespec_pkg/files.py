"""The file idioms every artifact, cache and state writer and reader shares.

`write_atomic`: write a temporary sibling, then rename it over the target, so a crash or a full
disk never leaves a half-written manifest, sidecar or engine that a later load would half-read.
`read_json_object`: a JSON file that must hold an object, refused with one ArtifactError line
("... is corrupt") instead of a traceback when it is not valid JSON or not an object.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from treespec.errors import ArtifactError


def write_atomic(path: Path, data: bytes | memoryview | str) -> Path:
    """Write `data` to `path` through a hidden per-process temporary and a rename (atomic on one
    filesystem; concurrent writers never share a temporary, the last rename wins).

    A memoryview (of a TensorRT engine's IHostMemory, say) is written without a copy."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no temporary behind
    return path


def write_json(path: Path, data: Any) -> Path:
    """`data` as indented JSON, written atomically."""
    return write_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json_object(path: Path, name: str | None = None) -> dict[str, Any]:
    """The JSON object in `path`; ArtifactError naming `name` (default: the path) if it is not one."""
    shown = name or str(path)
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer over 4300 digits
        raise ArtifactError(f"{shown} is corrupt (not valid JSON: {str(exc)[:200]})") from None
    except RecursionError:
        raise ArtifactError(f"{shown} is corrupt (JSON nested too deeply)") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{shown} is corrupt (not a JSON object)")
    return data


def read_json_or_empty(path: Path) -> dict[str, Any]:
    """A cache or state file's JSON object; {} when it is missing, unreadable or not an object
    (such files are re-made, never trusted)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}

"""Where treespec-export may write: checked before anything is loaded or exported.

`--force` once replaced whatever `--out` held (issue 14: a home folder is one typo away). Now it
may replace only an empty folder or one that a previous export wrote, recognised by its
manifest.json (a JSON object with treespec's `schema_version` and `treespec_version`). Anything
else is refused and left untouched. Paths that can never become the artifact directory (under a
file, the current folder or one holding it, a folder we cannot write in) are refused up front,
not after a minutes-long export.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from treespec.artifacts import MANIFEST_NAME
from treespec.errors import InputError
from treespec.exporter.triton_repo import STAMP

MAX_MANIFEST_BYTES = 16 << 20


def written_by_treespec(folder: Path) -> bool:
    """True when `folder` holds a manifest.json that treespec-export wrote."""
    path = folder / MANIFEST_NAME
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and isinstance(data.get("schema_version"), int)
            and isinstance(data.get("treespec_version"), str))


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an --out that the export could not write or must not replace; touch nothing."""
    _check_location(out)
    if out.is_symlink():
        raise InputError(f"--out {out} is a symbolic link: give the folder it points to, or a new one")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise InputError(f"--out {out} is not empty: choose another directory or pass --force to replace it")
    if not written_by_treespec(out):
        raise InputError(f"--out {out} holds files that treespec-export did not write (no treespec "
                         "manifest.json): --force replaces only an earlier export or an empty folder; "
                         "choose another directory")


def check_triton_repo_dir(repo: Path, force: bool, option: str = "--triton-repo") -> None:
    """--triton-repo with --force may replace only a Triton model repository that treespec wrote (its
    stamp file is there) or an empty folder; checked before the export starts."""
    _check_location(repo, option)
    if repo.is_symlink() or (repo.exists() and not repo.is_dir()):
        raise InputError(f"{option} {repo} is not a directory")
    if not force or not repo.is_dir() or not any(repo.iterdir()):
        return
    if not (repo / STAMP).is_file():
        raise InputError(f"{option} {repo} holds files that treespec did not write (no {STAMP}): --force "
                         "replaces only a model repository treespec wrote or an empty folder; choose another "
                         "directory")


def _check_location(out: Path, option: str = "--out") -> None:
    """`out` is a new or replaceable folder: not the current one, not under a file, writable."""
    here = Path.cwd().resolve()
    resolved = out.resolve()
    if resolved == here or resolved in here.parents:
        raise InputError(f"{option} {out} is the current folder or holds it: name a new folder")
    parent = _nearest_existing(out.absolute().parent)
    if not parent.is_dir():
        raise InputError(f"{option} {out} cannot be a directory: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {out}: no permission to write in {parent}")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path

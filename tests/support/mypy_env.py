"""Prepare `.cache/mypy/` (mypy.ini's mypy_path) so mypy can check treespec against tensorrt-stubs.

`python tests/support/mypy_env.py` does it by hand; tests/test_typing_tensorrt.py does it before mypy runs.

1. The package: treespec is installed with a package-dir mapping (exporter/ -> treespec.exporter,
   ...) through an editable-install import hook that mypy cannot follow, so `.cache/mypy/treespec/`
   is a tree of symlinks to the top-level folders.
2. The stubs: tensorrt-stubs (10.13.0.35.1, made by pybind11-stubgen) installs `tensorrt/` and
   `tensorrt_bindings/` without a py.typed marker, and `tensorrt_bindings/tensorrt.pyi` does not
   parse (plugin methods name a parameter `in`; `add_scale_nd` puts a required parameter after
   defaulted ones) and 14 methods return `...` where the generator could not name a type (mypy
   reads that as "never returns"); and the stubs define `bool` as a DataType constant, which
   shadows the builtin in every `-> bool` annotation. Both packages are copied to `.cache/mypy/` (ahead of
   site-packages) with `in` renamed `in_`, the defaults dropped on lines that would not parse
   otherwise, `typing.Any` for those `...` returns and `builtins.bool` in annotations.
   Nothing else changes.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MYPY_DIR = REPO / ".cache" / "mypy"
# The package map of pyproject.toml: the shared layer (treespec_pkg/) is the root, the wings sit in it.
LINKS = {**{p.name: f"treespec_pkg/{p.name}" for p in (REPO / "treespec_pkg").iterdir()
            if p.name != "__pycache__"},
         "exporter": "exporter", "runtime": "runtime", "plugins": "plugins", "configs": "configs"}
PACKAGES = ("tensorrt", "tensorrt_bindings")
_KEYWORD_PARAM = re.compile(r"(?<=[(,\s])in(?=\s*:)")
_UNNAMED_RETURN = re.compile(r"-> \.\.\.:")
_BOOL = re.compile(r"(?<!['\"])\bbool\b(?!['\"])")
_DEFAULT = re.compile(r"\s*=\s*(None|\.\.\.)(?=\s*[,)])")


def _installed_stub_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} stubs not found: pip install --no-deps tensorrt-stubs==10.13.0.35.1")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / "__init__.pyi").is_file():
        raise RuntimeError(f"{folder} has no __init__.pyi: is tensorrt-stubs installed?")
    return folder


def _repair(source: str, name: str) -> str:
    lines = source.splitlines(keepends=True)
    for _ in range(1000):
        try:
            ast.parse("".join(lines), filename=name)
            return "".join(lines)
        except SyntaxError as exc:
            if exc.lineno is None:
                raise
            i = exc.lineno - 1
            fixed = _KEYWORD_PARAM.sub("in_", lines[i])
            if fixed == lines[i]:
                fixed = _DEFAULT.sub("", lines[i])
            if fixed == lines[i]:
                raise RuntimeError(f"cannot repair {name}:{exc.lineno}: {exc.msg}") from None
            lines[i] = fixed
    raise RuntimeError(f"{name}: too many syntax errors to repair")


def _unshadow_bool(text: str) -> str:
    lines = [line if line.startswith("bool:") else _BOOL.sub("builtins.bool", line) for line in text.splitlines(True)]
    at = 1 if lines and lines[0].startswith("from __future__") else 0
    return "".join(lines[:at] + ["import builtins\n"] + lines[at:])


def ensure_package_links(target: Path = MYPY_DIR) -> Path:
    package = target / "treespec"
    package.mkdir(parents=True, exist_ok=True)
    for name, source in LINKS.items():
        link = package / name
        if link.is_symlink() and link.resolve() == (REPO / source).resolve():
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO / source, target_is_directory=(REPO / source).is_dir())
    return package


def ensure_mypy_env(target: Path = MYPY_DIR) -> Path:
    """Write the package links and the repaired stubs under `target` (idempotent); return it."""
    ensure_package_links(target)
    for package in PACKAGES:
        src = _installed_stub_dir(package)
        dst = target / package
        dst.mkdir(parents=True, exist_ok=True)
        for stub in sorted(src.glob("*.pyi")):
            text = _repair(stub.read_text(), f"{package}/{stub.name}")
            text = _UNNAMED_RETURN.sub("-> typing.Any:", text)
            text = _unshadow_bool(text)
            out = dst / stub.name
            if not out.exists() or out.read_text() != text:
                out.write_text(text)
    return target


if __name__ == "__main__":
    print(ensure_mypy_env())
    sys.exit(0)

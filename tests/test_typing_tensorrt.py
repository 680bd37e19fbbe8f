"""mypy (mypy.ini: strict) on the TensorRT code against tensorrt-stubs, with no ignores on TensorRT calls.

The TensorRT backend cannot run on this project's machines, so this is what checks every TensorRT
call it makes: names, argument and return types against NVIDIA's API as tensorrt-stubs describes it.
The files are checked by their module names (treespec.trt_api, treespec.exporter.engines, ...)
through the symlink farm of tests/support/mypy_env.py, so each is checked once, under the name its
importers use (by path, treespec_pkg/trt_api.py would be a second module, `treespec_pkg.trt_api`).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.mypy_env import REPO, ensure_mypy_env, ensure_package_links

FILES = {  # file -> module, by the package map of pyproject.toml
    "runtime/backends/tensorrt.py": "treespec.runtime.backends.tensorrt",
    "treespec_pkg/trt_api.py": "treespec.trt_api",
    "treespec_pkg/engine_record.py": "treespec.engine_record",
    "exporter/engines.py": "treespec.exporter.engines",
    "exporter/engine_profiles.py": "treespec.exporter.engine_profiles",
}


def test_mypy_tensorrt_paths():
    pytest.importorskip("mypy", reason="mypy is not installed")
    ensure_mypy_env()
    modules = [arg for module in FILES.values() for arg in ("-m", module)]
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "mypy.ini"), *modules]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{output}"
    assert f"no issues found in {len(FILES)} source files" in output, output


def test_module_names_match_the_package_map():
    """Each checked module is the checked file (a wrong mapping would check another file, or none)."""
    farm = ensure_package_links()
    for name, module in FILES.items():
        linked = farm.parent.joinpath(*module.split(".")).with_suffix(".py")
        assert linked.resolve() == (REPO / name).resolve(), (name, module, linked)


def test_no_type_ignores_on_tensorrt_calls():
    for name in FILES:
        for number, line in enumerate((REPO / name).read_text().splitlines(), 1):
            assert not re.search(r"#\s*type:\s*ignore", line), f"{name}:{number}: {line.strip()}"

"""mypy (mypy.ini: strict) on the TensorRT code against tensorrt-stubs, with no ignores on TensorRT calls.

The TensorRT backend cannot run on this project's machines, so this is what checks every TensorRT
call it makes: names, argument and return types against NVIDIA's API as tensorrt-stubs describes it.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.mypy_env import REPO, ensure_mypy_env

FILES = [
    "runtime/backends/tensorrt.py",
    "treespec_pkg/trt_api.py",
    "treespec_pkg/engine_record.py",
    "exporter/engines.py",
    "exporter/engine_profiles.py",
]


def test_mypy_tensorrt_paths():
    pytest.importorskip("mypy", reason="mypy is not installed")
    ensure_mypy_env()
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "mypy.ini"), *FILES]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{output}"


def test_no_type_ignores_on_tensorrt_calls():
    for name in FILES:
        for number, line in enumerate((REPO / name).read_text().splitlines(), 1):
            assert not re.search(r"#\s*type:\s*ignore", line), f"{name}:{number}: {line.strip()}"

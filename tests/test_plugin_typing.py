"""mypy (strict) on the tree-attention TensorRT plugin glue, against tensorrt-stubs.

Full TensorRT cannot be installed here, so this is what checks every `tensorrt` and
`tensorrt.plugin` call the plugin makes. tensorrt-stubs 10.13 has no `tensorrt.plugin`, so
plugins/stubs/tensorrt/plugin/__init__.pyi (written from NVIDIA's API reference) is placed next
to the repaired tensorrt-stubs that tests/mypy_env.py prepares, in .cache/mypy-plugins/.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from support.mypy_env import REPO, ensure_mypy_env

MYPY_DIR = REPO / ".cache" / "mypy-plugins"
STUB = REPO / "plugins" / "stubs" / "tensorrt" / "plugin" / "__init__.pyi"
MODULES = ["treespec.plugins.tree_attention.trt_plugin", "treespec.plugins.tree_attention.aot",
           "treespec.plugins.tree_attention.config"]
GLUE = REPO / "plugins" / "tree_attention" / "trt_plugin.py"


def prepare() -> None:
    ensure_mypy_env(MYPY_DIR)
    target = MYPY_DIR / "tensorrt" / "plugin" / "__init__.pyi"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(STUB, target)


def test_mypy_plugin_glue():
    pytest.importorskip("mypy", reason="mypy is not installed")
    prepare()
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "plugins" / "mypy.ini"),
           "--cache-dir", str(REPO / ".cache" / "mypy-plugins-cache")]
    for module in MODULES:
        cmd += ["-m", module]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout}{run.stderr}"


def test_no_type_ignores_in_glue():
    for number, line in enumerate(GLUE.read_text().splitlines(), 1):
        assert not re.search(r"#\s*type:\s*ignore", line), f"{GLUE.name}:{number}: {line.strip()}"

"""Helpers for the bad-input tests (tests/test_bad_input_*.py): artifact clones to break, fake
engines and weights, and running the console scripts in-process or as real subprocesses with
the checks every user error must pass (exit code 2, one `error:` line, no traceback)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import onnx
import torch
from onnx import TensorProto, helper
from safetensors.torch import save_file

from treespec.exporter.cli import main as export_main
from treespec.runtime.cli import main as runtime_main


def clone_artifacts(src: Path, dst: Path) -> Path:
    """A private copy of an artifact directory: *.data hard-linked (read-only use), rest copied."""

    def copy(s: str, d: str) -> None:
        if s.endswith(".data"):
            try:
                os.link(s, d)
                return
            except OSError:
                pass
        shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy)
    return dst


def edit_manifest(root: Path, change: Callable[[dict], None]) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.unlink()  # never write through a link
    path.write_text(json.dumps(data, indent=2))


def truncate(path: Path, keep: float = 0.5) -> None:
    blob = path.read_bytes()
    path.unlink()  # the clone may share the inode with the fixture: replace, never truncate in place
    path.write_bytes(blob[: int(len(blob) * keep)])


def fake_logits_graph(path: Path, vocab: int) -> Path:
    """A minimal ONNX graph whose `logits` output is [batch, tree_tokens, vocab] (zeros)."""
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["bt"]),
        helper.make_node("Constant", [], ["v"], value=helper.make_tensor("v", TensorProto.INT64, [1], [vocab])),
        helper.make_node("Concat", ["bt", "v"], ["shape"], axis=0),
        helper.make_node("ConstantOfShape", ["shape"], ["logits"],
                         value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
    ]
    graph = helper.make_graph(
        nodes, "fake_draft",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tree_tokens"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "tree_tokens", vocab])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    if path.exists():
        path.unlink()
    onnx.save(model, str(path))
    return path


def fake_engine(root: Path, keep: float) -> dict:
    """Write target.tensorrt.engine (+ record) into an artifact clone; keep a fraction of its bytes."""
    blob = bytes(range(256)) * 64
    record = {"file": "target.tensorrt.engine", "builder": "tensorrt", "builder_version": "10.13.0",
              "precision": "fp32", "profiles": [], "compute_capabilities": ["9.0"], "build_seconds": 1.0,
              "sha256": hashlib.sha256(blob).hexdigest(), "size_bytes": len(blob)}
    (root / record["file"]).write_bytes(blob[: int(len(blob) * keep)])
    edit_manifest(root, lambda m: m["graphs"]["target"].update(engines=[record]))
    return record


def save_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> Path:
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert len(lines[0]) > len("error: ") + 10, lines[0]
    return lines[0]


def cli_command(tool: str) -> list[str]:
    script = Path(sys.executable).parent / tool
    if script.is_file():
        return [str(script)]
    module = "treespec.runtime.cli" if tool == "treespec" else "treespec.exporter.cli"
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def run_subprocess(tool: str, *args: str, cwd: Path | None = None, timeout: float = 120,
                   preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cli_command(tool) + list(args), capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL, cwd=cwd, preexec_fn=preexec_fn)


def run_in_process(tool: str, argv: list[str], capsys) -> tuple[int, str]:
    main = runtime_main if tool == "treespec" else export_main
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    """A user error from a real subprocess: exit 2, exactly one stderr line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert len(lines[0]) < 1000, lines[0][:1000]
    return lines[0]

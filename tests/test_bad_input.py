"""The bad-input matrix (issue 8, item 1): every case fails with one clear message.

API: the right TreespecError subclass (InputError, ArtifactError, ModelLoadError) with a message
that names the problem. CLI: exit code 2, exactly one `error: ...` line on stderr, no traceback.
Most CLI cases run `main(argv)` in-process (same code path as the console scripts, without paying
the interpreter + torch import for each); a few representative ones run as real subprocesses.

Broken artifact directories are clones of the session's tiny artifacts in tmp_path (small files
copied, the large *.onnx.data hard-linked and never written to; a file to corrupt is replaced).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from treespec.errors import ArtifactError, InputError, ModelLoadError, TreespecError

CONTEXT = 256  # the tiny artifacts' max_context
PROFILE_TREE_TOKENS = 128  # their graphs' profile maximum
MEDUSA_HEADS = 4


# -- helpers -----------------------------------------------------------------------------------

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
    import onnx
    from onnx import TensorProto, helper

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
    import torch
    from safetensors.torch import save_file

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


def run_subprocess(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cli_command(tool) + list(args), capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL)


def run_in_process(tool: str, argv: list[str], capsys) -> tuple[int, str]:
    if tool == "treespec":
        from treespec.runtime.cli import main
    else:
        from treespec.exporter.cli import main
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def medusa_gen(tiny_artifacts):
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(tiny_artifacts, drafter="medusa", threads=1)
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def bad_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trees") / "broken.yaml"
    path.write_text("policy: widths\nwidths: [4, 8\n")
    return path


# -- API: prompts, lengths, sampling, trees --------------------------------------------------------

NEST = [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]  # 5 levels > 4 Medusa heads
API_CASES = {
    # name: (prompt, generate kwargs, message pattern)
    "empty prompt": ("", {}, r"prompt is empty"),
    "blank prompt": (" \n\t ", {}, r"prompt is empty"),
    "empty token list": ([], {}, r"prompt is empty"),
    "empty chat messages": ([{"role": "user", "content": "  "}], {}, r"prompt is empty"),
    "prompt over the context": ("word " * 400, {}, rf"context limit is {CONTEXT}"),
    "token ids filling the context": ([5] * CONTEXT, {}, rf"{CONTEXT} tokens; the context limit is {CONTEXT}"),
    "token id outside the vocabulary": ([1, 10 ** 7], {}, r"token ids must be integers in \[0, 49152\)"),
    "max_new_tokens 0": ("Hi", {"max_new_tokens": 0}, r"max_new_tokens must be a positive integer, got 0"),
    "max_new_tokens negative": ("Hi", {"max_new_tokens": -5}, r"max_new_tokens must be a positive integer, got -5"),
    "max_new_tokens huge": ("Hi", {"max_new_tokens": 10 ** 12}, r"max_new_tokens 1000000000000 is over the limit"),
    "max_new_tokens not an int": ("Hi", {"max_new_tokens": 2.5}, r"max_new_tokens must be a positive integer"),
    "temperature negative": ("Hi", {"temperature": -0.5}, r"temperature must be >= 0"),
    "temperature nan": ("Hi", {"temperature": float("nan")}, r"temperature must be >= 0 and finite, got nan"),
    "temperature inf": ("Hi", {"temperature": float("inf")}, r"temperature must be >= 0 and finite, got inf"),
    "top_p 0": ("Hi", {"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    "top_p negative": ("Hi", {"top_p": -0.2}, r"top_p must be in \(0, 1\]"),
    "top_p over 1": ("Hi", {"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    "top_p nan": ("Hi", {"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
    "top_k negative": ("Hi", {"top_k": -1}, r"top_k must be an integer >= 0"),
    "tree width zero": ("Hi", {"tree": {"policy": "widths", "widths": [0]}}, r"'widths' must be a positive integer, got 0"),
    "tree width negative": ("Hi", {"tree": {"policy": "widths", "widths": [4, -2]}}, r"'widths' must be a positive integer, got -2"),
    "tree widths empty": ("Hi", {"tree": {"policy": "widths", "widths": []}}, r"'widths' must be a non-empty list"),
    "tree branching zero": ("Hi", {"tree": {"policy": "depth_branching", "depth": 3, "branching": 0}},
                            r"'branching' must be a positive integer, got 0"),
    "tree budget negative": ("Hi", {"tree": {"policy": "opt", "budget": -4}}, r"'budget' must be a positive integer"),
    "tree over the graph profile": ("Hi", {"tree": {"policy": "widths", "widths": [64, 64, 64]}},
                                    rf"193 nodes but the target graph's profile allows {PROFILE_TREE_TOKENS} tree tokens"),
    "tree opt budget over the profile": ("Hi", {"tree": {"policy": "opt", "budget": 500}},
                                         rf"profile allows {PROFILE_TREE_TOKENS} tree tokens"),
    "tree deeper than the Medusa heads": ("Hi", {"tree": {"policy": "choices", "choices": NEST}},
                                          rf"needs 5 Medusa heads but the graph has {MEDUSA_HEADS}"),
    "tree choice without its parent": ("Hi", {"tree": {"policy": "choices", "choices": [[0], [1, 0]]}},
                                       r"choice \[1, 0\] has no parent \[1\]"),
    "tree unknown policy": ("Hi", {"tree": {"policy": "bushy"}}, r"unknown policy 'bushy'"),
    "tree unknown field": ("Hi", {"tree": {"policy": "opt", "widht": 3}}, r"unknown field\(s\) widht"),
    "tree not a mapping": ("Hi", {"tree": ["widths"]}, r"tree config must be a mapping"),
    "tree invalid inline JSON": ("Hi", {"tree": '{"policy": "widths", '}, r"tree: invalid JSON"),
    "tree unknown preset": ("Hi", {"tree": "no-such-tree"}, r"unknown tree 'no-such-tree'"),
    "tree file missing": ("Hi", {"tree": "/nonexistent/tree.yaml"}, r"tree config file /nonexistent/tree.yaml does not exist"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_bad_request(medusa_gen, case):
    prompt, kwargs, pattern = API_CASES[case]
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(InputError, match=pattern):
        medusa_gen.generate(prompt, **kwargs)


def test_api_malformed_yaml_tree_file(medusa_gen, bad_yaml):
    with pytest.raises(InputError, match=rf"{re.escape(str(bad_yaml))}: malformed YAML"):
        medusa_gen.generate("Hi", max_new_tokens=4, tree=str(bad_yaml))


def test_api_generator_still_works_after_bad_requests(medusa_gen):
    """Refused requests leave the generator usable (no half-updated state)."""
    for kwargs in ({"temperature": -1}, {"tree": {"policy": "widths", "widths": [0]}}, {"max_new_tokens": 0}):
        with pytest.raises(InputError):
            medusa_gen.generate("Hi", **{"max_new_tokens": 4, **kwargs})
    assert len(medusa_gen.generate("Hi", max_new_tokens=4).token_ids) == 4


# -- API: broken artifact directories --------------------------------------------------------------

def _missing(name: str):
    def corrupt(root: Path) -> None:
        target = root / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return corrupt


ARTIFACT_CASES = {
    # name: (corrupt(root), drafter, backend, message pattern)
    "missing target.onnx": (_missing("target.onnx"), None, "onnxruntime",
                            r"file 'target.onnx' named in the manifest is missing"),
    "missing external data": (_missing("target.onnx.data"), None, "onnxruntime",
                              r"file 'target.onnx.data' named in the manifest is missing"),
    "missing tokenizer": (_missing("tokenizer"), None, "onnxruntime",
                          r"file 'tokenizer' named in the manifest is missing"),
    "missing medusa graph": (_missing("medusa.onnx"), "medusa", "onnxruntime",
                             r"file 'medusa.onnx' named in the manifest is missing"),
    "missing manifest": (_missing("manifest.json"), None, "onnxruntime", r"has no manifest.json"),
    "truncated ONNX": (lambda r: truncate(r / "target.onnx"), None, "onnxruntime",
                       r"ONNX Runtime cannot load target.onnx: .*Protobuf parsing failed"),
    "empty ONNX": (lambda r: truncate(r / "target.onnx", 0.0), None, "onnxruntime",
                   r"ONNX Runtime cannot load target.onnx"),
    "truncated external data": (lambda r: truncate(r / "target.onnx.data", 0.6), None, "onnxruntime",
                                r"ONNX Runtime cannot load target.onnx: .*out of bounds"),
    "truncated draft graph": (lambda r: truncate(r / "draft.onnx"), "draft", "onnxruntime",
                              r"ONNX Runtime cannot load draft.onnx"),
    "truncated engine": (lambda r: fake_engine(r, keep=0.5), None, "tensorrt",
                         r"engine target.tensorrt.engine \(built by tensorrt 10.13.0\) is corrupt: it has 8192 "
                         r"bytes but tensorrt wrote 16384 \(truncated"),
    "missing engine": (lambda r: (fake_engine(r, keep=1.0), (r / "target.tensorrt.engine").unlink()), None,
                       "tensorrt", r"engine target.tensorrt.engine \(built by tensorrt 10.13.0\) is missing"),
    "manifest from a newer schema": (lambda r: edit_manifest(r, lambda m: m.update(schema_version=2)), None,
                                     "onnxruntime", r"uses manifest schema 2, newer than this treespec understands \(1\)"),
    "manifest without schema": (lambda r: edit_manifest(r, lambda m: m.pop("schema_version")), None,
                                "onnxruntime", r"has no schema_version"),
    "manifest not JSON": (lambda r: ((r / "manifest.json").unlink(), (r / "manifest.json").write_text("{oops")),
                          None, "onnxruntime", r"manifest.json is corrupt \(not valid JSON"),
    "manifest path with ../": (lambda r: edit_manifest(r, lambda m: m["graphs"]["target"].update(
        onnx="../elsewhere/target.onnx")), None, "onnxruntime",
        r"manifest path '../elsewhere/target.onnx' points outside the artifact directory"),
    "manifest graph without onnx": (lambda r: edit_manifest(r, lambda m: m["graphs"]["target"].pop("onnx")),
                                    None, "onnxruntime", r"graph 'target' must be an object with an 'onnx' file name"),
    "manifest target without profile": (lambda r: edit_manifest(r, lambda m: m["graphs"]["target"].pop("profile")),
                                        None, "onnxruntime", r"graph 'target' needs a 'profile'"),
    "manifest tokenizer section broken": (lambda r: edit_manifest(r, lambda m: m.update(tokenizer={})), None,
                                          "onnxruntime", r"'tokenizer' must be an object with a 'path' string"),
    "manifest model section incomplete": (lambda r: edit_manifest(r, lambda m: m["model"].pop("vocab_size")),
                                          None, "onnxruntime", r"'model' section is incomplete or invalid"),
    "manifest names an absent drafter": (lambda r: edit_manifest(r, lambda m: m.update(
        drafters={"lookup": {}})), "medusa", "onnxruntime", r"these artifacts have no 'medusa' drafter"),
    "draft graph with another vocabulary": (lambda r: fake_logits_graph(r / "draft.onnx", vocab=1000), "draft",
                                            "onnxruntime", r"'draft' graph has a vocabulary of 1000 \(logits\) "
                                            r"but the target model's is 49152"),
}


@pytest.mark.parametrize("case", list(ARTIFACT_CASES))
def test_api_broken_artifacts(tiny_artifacts, tmp_path, case):
    from treespec.runtime.api import SpeculativeGenerator

    corrupt, drafter, backend, pattern = ARTIFACT_CASES[case]
    root = clone_artifacts(tiny_artifacts, tmp_path / "artifacts")
    corrupt(root)
    kwargs = {"device": "cuda"} if backend == "tensorrt" else {"threads": 1}
    with pytest.raises(ArtifactError, match=pattern):
        SpeculativeGenerator.from_artifacts(root, backend, drafter=drafter, **kwargs)


def test_engine_check_refuses_truncated_file(tmp_path):
    """engine_record.check_engine, directly: a truncated engine never reaches a deserializer."""
    from treespec.engine_record import check_engine, write_sidecar

    record = fake_engine_record(tmp_path)
    path = tmp_path / record["file"]
    blob = path.read_bytes()
    path.write_bytes(blob[:100])
    with pytest.raises(ArtifactError, match=r"is corrupt: it has 100 bytes .*truncated or overwritten"):
        check_engine(path, record)
    write_sidecar(path, record)  # the same through the sidecar record
    with pytest.raises(ArtifactError, match=r"truncated or overwritten"):
        check_engine(path)
    path.write_bytes(blob[:-1] + b"\x00")  # right size, altered content
    with pytest.raises(ArtifactError, match=r"SHA-256 differs"):
        check_engine(path, record)


def fake_engine_record(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"graphs": {"target": {}}}))
    return fake_engine(root, keep=1.0)


def test_api_missing_or_non_directory_artifacts(tmp_path):
    from treespec.runtime.api import SpeculativeGenerator

    with pytest.raises(ArtifactError, match=r"artifact directory .*nope does not exist"):
        SpeculativeGenerator.from_artifacts(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"is not a directory"):
        SpeculativeGenerator.from_artifacts(tmp_path / "file")


# -- exporter: output folder, model, drafter weights -----------------------------------------------

def test_export_out_not_empty_or_a_file(tmp_path):
    from treespec.exporter.pipeline import ExportOptions, run_export

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=r"is not empty: choose another directory or pass --force"):
        run_export(ExportOptions(model="tiny-random", out=full), progress=lambda m: None)
    assert (full / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match=r"is a file, not a directory"):
        run_export(ExportOptions(model="tiny-random", out=a_file), progress=lambda m: None)


def test_export_unknown_model(tmp_path):
    from treespec.models.checkpoint import load_checkpoint

    with pytest.raises(ModelLoadError, match=r"unknown model 'no-such-model': no such file, folder or preset"):
        load_checkpoint("no-such-model")
    (tmp_path / "weights.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ModelLoadError, match=r"unsupported file type"):
        load_checkpoint(str(tmp_path / "weights.pt"))


def _fake_target(vocab: int = 49152, hidden: int = 64):
    from torch import nn

    config = SimpleNamespace(vocab_size=vocab, hidden_size=hidden)
    return SimpleNamespace(config=config, lm_head=nn.Linear(hidden, vocab, bias=False))


def test_drafter_weights_for_another_vocabulary(tmp_path):
    from treespec.models.drafter_models import draft_from_weights, medusa_from_weights

    other = save_safetensors(tmp_path / "other.safetensors", {"blocks.0.weight": (64, 64), "blocks.0.bias": (64,)},
                             {"vocab_size": "32000", "hidden_size": "64", "num_heads": "1"})
    with pytest.raises(InputError, match=r"drafter was trained for vocab_size=32000, the target has 49152"):
        medusa_from_weights(_fake_target(), other)
    with pytest.raises(InputError, match=r"drafter was trained for vocab_size=32000"):
        draft_from_weights(_fake_target(), other, num_layers=1)


def test_drafter_weights_for_another_width_without_metadata(tmp_path):
    """No metadata to compare: the tensor shapes still refuse it, with a message, not a traceback."""
    from treespec.models.drafter_models import medusa_from_weights

    narrow = save_safetensors(tmp_path / "narrow.safetensors", {"blocks.0.weight": (32, 32), "blocks.0.bias": (32,)}, {})
    with pytest.raises(InputError, match=r"drafter weights do not fit the target \(.*size mismatch"):
        medusa_from_weights(_fake_target(), narrow)
    bad_meta = save_safetensors(tmp_path / "meta.safetensors", {"blocks.0.weight": (64, 64)}, {"num_heads": "four"})
    with pytest.raises(InputError, match=r"metadata 'num_heads' must be an integer, got 'four'"):
        medusa_from_weights(_fake_target(), bad_meta)
    not_safetensors = tmp_path / "heads.safetensors"
    not_safetensors.write_bytes(b"\x80\x04\x95 pickled?")
    with pytest.raises(InputError, match=r"not a readable safetensors file"):
        medusa_from_weights(_fake_target(), not_safetensors)


# -- CLI, in-process (the console scripts' main) ---------------------------------------------------

CLI_GENERATE_CASES = {
    # name: (extra argv, message pattern)
    "empty prompt": (["--prompt", ""], r"^error: the prompt is empty$"),
    "no prompt": ([], r"^error: give --prompt TEXT"),
    "prompt over the context": (["--prompt", "word " * 400], rf"context limit is {CONTEXT}"),
    "max-new-tokens 0": (["--prompt", "Hi", "--max-new-tokens", "0"], r"max_new_tokens must be a positive integer, got 0"),
    "max-new-tokens negative": (["--prompt", "Hi", "--max-new-tokens", "-3"], r"got -3"),
    "max-new-tokens huge": (["--prompt", "Hi", "--max-new-tokens", str(10 ** 15)], r"is over the limit"),
    "temperature negative": (["--prompt", "Hi", "--temperature", "-1"], r"temperature must be >= 0"),
    "temperature nan": (["--prompt", "Hi", "--temperature", "nan"], r"temperature must be >= 0 and finite"),
    "top-p 0": (["--prompt", "Hi", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
    "top-p over 1": (["--prompt", "Hi", "--top-p", "1.01"], r"top_p must be in \(0, 1\]"),
    "tree zero width": (["--prompt", "Hi", "--tree", '{"policy": "widths", "widths": [4, 0]}'],
                        r"'widths' must be a positive integer, got 0"),
    "tree over the profile": (["--prompt", "Hi", "--tree", '{"policy": "choices", "choices": '
                               + json.dumps([[i] for i in range(200)]) + "}"],
                              rf"201 nodes but the target graph's profile allows {PROFILE_TREE_TOKENS}"),
    "tree deeper than the Medusa heads": (["--prompt", "Hi", "--drafter", "medusa", "--tree",
                                           json.dumps({"policy": "choices", "choices": NEST})],
                                          r"needs 5 Medusa heads but the graph has 4"),
    "unknown drafter": (["--prompt", "Hi", "--drafter", "eagle"], r"these artifacts have no 'eagle' drafter"),
    "prompts file missing": (["--prompts-file", "/nonexistent/p.jsonl"], r"prompts file /nonexistent/p.jsonl does not exist"),
}


@pytest.mark.parametrize("case", list(CLI_GENERATE_CASES))
def test_cli_generate_bad_input(tiny_artifacts, capsys, case):
    extra, pattern = CLI_GENERATE_CASES[case]
    code, err = run_in_process("treespec", ["generate", "--artifacts", str(tiny_artifacts), "--threads", "1",
                                            "--max-new-tokens", "4", *extra], capsys)
    assert code == 2
    assert re.search(pattern, one_error_line(err)), err


def test_cli_generate_malformed_yaml_tree(tiny_artifacts, bad_yaml, capsys):
    code, err = run_in_process("treespec", ["generate", "--artifacts", str(tiny_artifacts), "--threads", "1",
                                            "--prompt", "Hi", "--tree", str(bad_yaml)], capsys)
    assert code == 2
    assert re.search(r"broken.yaml: malformed YAML: while parsing a flow sequence", one_error_line(err)), err


def test_cli_export_bad_options(tmp_path, capsys):
    cases = [
        (["tiny-random", "--out", str(tmp_path / "o1"), "--max-tree-tokens", "0"], r"--max-tree-tokens must be positive"),
        (["tiny-random", "--out", str(tmp_path / "o2"), "--drafter-weights", "eagle=x"],
         r"--drafter-weights expects medusa=PATH or draft=PATH, got 'eagle=x'"),
        (["tiny-random", "--out", str(tmp_path / "o3"), "--drafter-weights", "medusa=/nonexistent.safetensors"],
         r"--drafter-weights: /nonexistent.safetensors does not exist"),
    ]
    for argv, pattern in cases:
        code, err = run_in_process("treespec-export", argv, capsys)
        assert code == 2, argv
        assert re.search(pattern, one_error_line(err)), err
    assert not any(tmp_path.iterdir())


# -- CLI, real subprocesses --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_dirs(tiny_artifacts, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cli")
    newer = clone_artifacts(tiny_artifacts, base / "newer")
    edit_manifest(newer, lambda m: m.update(schema_version=7))
    truncated = clone_artifacts(tiny_artifacts, base / "truncated")
    truncate(truncated / "target.onnx")
    engine = clone_artifacts(tiny_artifacts, base / "engine")
    fake_engine(engine, keep=0.25)
    full = base / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    (base / "a_file").write_text("x")
    weights = save_safetensors(base / "medusa-other-vocab.safetensors",
                               {"blocks.0.weight": (64, 64), "blocks.0.bias": (64,)},
                               {"vocab_size": "32000", "hidden_size": "64", "num_heads": "1"})
    return {"base": base, "newer": newer, "truncated": truncated, "engine": engine, "full": full,
            "file": base / "a_file", "weights": weights}


SUBPROCESS_CASES = {
    # name: (tool, argv built from cli_dirs, message pattern)
    "generate: missing artifacts dir": ("treespec", lambda d: ["generate", "--artifacts", str(d["base"] / "none"),
                                                              "--prompt", "Hi"],
                                        r"^error: artifact directory .*none does not exist"),
    "generate: newer manifest schema": ("treespec", lambda d: ["generate", "--artifacts", str(d["newer"]), "--prompt", "Hi"],
                                        r"uses manifest schema 7, newer than this treespec understands"),
    "generate: empty prompt": ("treespec", lambda d: ["generate", "--artifacts", str(d["tiny"]), "--prompt", "  "],
                               r"^error: the prompt is empty$"),
    "generate: truncated ONNX": ("treespec", lambda d: ["generate", "--artifacts", str(d["truncated"]), "--prompt", "Hi"],
                                 r"ONNX Runtime cannot load target.onnx"),
    "generate: truncated engine": ("treespec", lambda d: ["generate", "--artifacts", str(d["engine"]), "--prompt", "Hi",
                                                          "--backend", "tensorrt", "--device", "cuda"],
                                   r"is corrupt: it has 4096 bytes but tensorrt wrote 16384"),
    "export: --out not empty": ("treespec-export", lambda d: ["tiny-random", "--out", str(d["full"])],
                                r"is not empty: choose another directory or pass --force"),
    "export: --out is a file": ("treespec-export", lambda d: ["tiny-random", "--out", str(d["file"])],
                                r"is a file, not a directory"),
    "export: unknown model": ("treespec-export", lambda d: ["no-such-model", "--out", str(d["base"] / "out1")],
                              r"unknown model 'no-such-model'"),
    "export: drafter weights for another vocabulary": (
        "treespec-export", lambda d: ["tiny-random", "--out", str(d["base"] / "out2"), "--drafter", "medusa",
                                      "--drafter-weights", f"medusa={d['weights']}"],
        r"drafter was trained for vocab_size=32000, the target has 49152"),
}

@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_cli_subprocess(cli_dirs, tiny_artifacts, case):
    tool, argv, pattern = SUBPROCESS_CASES[case]
    result = run_subprocess(tool, *argv({**cli_dirs, "tiny": tiny_artifacts}))
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert re.search(pattern, one_error_line(result.stderr)), result.stderr[-2000:]
    assert result.stdout.strip() == ""
    if tool == "treespec-export":
        assert (cli_dirs["full"] / "keep.txt").read_text() == "mine"
        assert not (cli_dirs["base"] / "out1").exists() and not (cli_dirs["base"] / "out2").exists()
        assert not [p for p in cli_dirs["base"].iterdir() if ".tmp-" in p.name]  # no leftover work dir


def test_every_error_is_a_treespec_error():
    """The CLIs catch TreespecError (and BackendError): the refusals above all derive from it."""
    assert all(issubclass(e, TreespecError) for e in (InputError, ArtifactError, ModelLoadError))

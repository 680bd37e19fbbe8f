"""Bad artifact directories: each is refused with one ArtifactError line naming the problem.

Broken artifact directories are clones of the session's tiny artifacts in tmp_path (small files
copied, the large *.onnx.data hard-linked and never written to; a file to corrupt is replaced).
Paths in the manifest, and files inside the folders it names, may not leave the directory, not
even through a symbolic link.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from support.bad_input import (assert_one_line_error, clone_artifacts, edit_manifest, fake_engine,
                               fake_logits_graph, run_subprocess, truncate)
from treespec.errors import ArtifactError, InputError, ModelLoadError, TreespecError
from treespec.artifacts import load_manifest
from treespec.engine_record import check_engine, write_sidecar
from treespec.runtime.api import SpeculativeGenerator


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
    "manifest from a newer schema": (lambda r: edit_manifest(r, lambda m: m.update(schema_version=3)), None,
                                     "onnxruntime", r"uses manifest schema 3, newer than this treespec understands \(2\)"),
    "manifest from an older schema": (lambda r: edit_manifest(r, lambda m: m.update(schema_version=1)), None,
                                      "onnxruntime", r"uses manifest schema 1, older than this treespec reads \(2\): "
                                      r"re-export the artifacts with treespec-export"),
    "manifest nested 100000 deep": (lambda r: ((r / "manifest.json").unlink(),
                                               (r / "manifest.json").write_text("[" * 100_000)),
                                    None, "onnxruntime", r"manifest.json is corrupt \(JSON nested too deeply\)"),
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
    corrupt, drafter, backend, pattern = ARTIFACT_CASES[case]
    root = clone_artifacts(tiny_artifacts, tmp_path / "artifacts")
    corrupt(root)
    kwargs = {"device": "cuda"} if backend == "tensorrt" else {"threads": 1}
    with pytest.raises(ArtifactError, match=pattern):
        SpeculativeGenerator.from_artifacts(root, backend, drafter=drafter, **kwargs)


def test_engine_check_refuses_truncated_file(tmp_path):
    """engine_record.check_engine, directly: a truncated engine never reaches a deserializer."""
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
    with pytest.raises(ArtifactError, match=r"artifact directory .*nope does not exist"):
        SpeculativeGenerator.from_artifacts(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"is not a directory"):
        SpeculativeGenerator.from_artifacts(tmp_path / "file")


def _link_out(name: str):
    """Replace `name` in the artifacts by a symbolic link to a copy outside them."""
    def corrupt(root: Path) -> None:
        inside = root / name
        outside = root.parent / "outside" / Path(name).name
        outside.parent.mkdir(exist_ok=True)
        shutil.copyfile(inside, outside)
        inside.unlink()
        inside.symlink_to(outside)
    return corrupt


LINK_CASES = {
    "target graph": ("target.onnx", r"manifest path 'target.onnx' points outside the artifact directory"),
    "tokenizer file": ("tokenizer/tokenizer.json",
                       r"'tokenizer/tokenizer.json' is a link that points outside the artifact directory"),
    "manifest itself": ("manifest.json", r"manifest.json is a link that points outside the artifact directory"),
}


@pytest.mark.parametrize("case", list(LINK_CASES))
def test_api_symlink_out_of_the_artifacts(tiny_artifacts, tmp_path, case):
    name, pattern = LINK_CASES[case]
    root = clone_artifacts(tiny_artifacts, tmp_path / "artifacts")
    _link_out(name)(root)
    with pytest.raises(ArtifactError, match=pattern):
        SpeculativeGenerator.from_artifacts(root, threads=1)


def test_symlink_inside_the_artifacts_is_fine(tiny_artifacts, tmp_path):
    root = clone_artifacts(tiny_artifacts, tmp_path / "artifacts")
    (root / "tokenizer" / "copy.json").write_text("{}")
    (root / "tokenizer" / "alias.json").symlink_to(root / "tokenizer" / "copy.json")
    assert load_manifest(root).tokenizer_dir.is_dir()


# -- CLI, real subprocesses ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broken_dirs(tiny_artifacts, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cli")
    newer = clone_artifacts(tiny_artifacts, base / "newer")
    edit_manifest(newer, lambda m: m.update(schema_version=7))
    truncated = clone_artifacts(tiny_artifacts, base / "truncated")
    truncate(truncated / "target.onnx")
    engine = clone_artifacts(tiny_artifacts, base / "engine")
    fake_engine(engine, keep=0.25)
    linked = clone_artifacts(tiny_artifacts, base / "linked")
    _link_out("tokenizer/tokenizer.json")(linked)
    return {"base": base, "newer": newer, "truncated": truncated, "engine": engine, "linked": linked}


SUBPROCESS_CASES = {
    # name: (argv built from broken_dirs, message pattern)
    "missing artifacts dir": (lambda d: ["--artifacts", str(d["base"] / "none")],
                              r"^error: artifact directory .*none does not exist"),
    "newer manifest schema": (lambda d: ["--artifacts", str(d["newer"])],
                              r"uses manifest schema 7, newer than this treespec understands"),
    "truncated ONNX": (lambda d: ["--artifacts", str(d["truncated"])], r"ONNX Runtime cannot load target.onnx"),
    "truncated engine": (lambda d: ["--artifacts", str(d["engine"]), "--backend", "tensorrt", "--device", "cuda"],
                         r"is corrupt: it has 4096 bytes but tensorrt wrote 16384"),
    "tokenizer file linked outside": (lambda d: ["--artifacts", str(d["linked"])],
                                      r"'tokenizer/tokenizer.json' is a link that points outside"),
}


@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_cli_subprocess(broken_dirs, case):
    argv, pattern = SUBPROCESS_CASES[case]
    result = run_subprocess("treespec", "generate", *argv(broken_dirs), "--prompt", "Hi")
    assert re.search(pattern, assert_one_line_error(result)), result.stderr[-2000:]
    assert result.stdout.strip() == ""


def test_every_error_is_a_treespec_error():
    """The CLIs catch TreespecError (and BackendError): the refusals above all derive from it."""
    assert all(issubclass(e, TreespecError) for e in (InputError, ArtifactError, ModelLoadError))

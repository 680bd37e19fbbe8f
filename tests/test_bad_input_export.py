"""Bad input to treespec-export: the output folder, the model, drafter weights, options.

`--force` replaces only an earlier export or an empty folder (issue 14): a folder holding anything
else is refused and left untouched. An --out that can never become the artifact directory (under
a file, the current folder) is refused before the export, not after it. CLI errors: exit code 2,
exactly one `error: ...` line on stderr, no traceback.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

from support.bad_input import (assert_one_line_error, clone_artifacts, one_error_line, run_in_process,
                               run_subprocess, save_safetensors)
from treespec.errors import InputError, ModelLoadError
from treespec.exporter.cli import DEFAULT_MAX_CONTEXT
from treespec.exporter.cli import build_parser as export_parser
from treespec.exporter.output_dir import check_output_dir, check_triton_repo_dir
from treespec.exporter.pipeline import ExportOptions, run_export
from treespec.exporter.triton_repo import STAMP
from treespec.models.checkpoint import load_checkpoint
from treespec.models.drafter_models import draft_from_weights, medusa_from_weights
from treespec.runtime.commands.demo import DEMO_ARTIFACTS


# -- exporter: output folder, model, drafter weights -----------------------------------------------

def test_export_out_not_empty_or_a_file(tmp_path):
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
    with pytest.raises(ModelLoadError, match=r"unknown model 'no-such-model': no such file, folder or preset"):
        load_checkpoint("no-such-model")
    (tmp_path / "weights.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ModelLoadError, match=r"unsupported file type"):
        load_checkpoint(str(tmp_path / "weights.pt"))


def _fake_target(vocab: int = 49152, hidden: int = 64):
    config = SimpleNamespace(vocab_size=vocab, hidden_size=hidden)
    return SimpleNamespace(config=config, lm_head=nn.Linear(hidden, vocab, bias=False))


def test_drafter_weights_for_another_vocabulary(tmp_path):
    other = save_safetensors(tmp_path / "other.safetensors", {"blocks.0.weight": (64, 64), "blocks.0.bias": (64,)},
                             {"vocab_size": "32000", "hidden_size": "64", "num_heads": "1"})
    with pytest.raises(InputError, match=r"drafter was trained for vocab_size=32000, the target has 49152"):
        medusa_from_weights(_fake_target(), other)
    with pytest.raises(InputError, match=r"drafter was trained for vocab_size=32000"):
        draft_from_weights(_fake_target(), other, num_layers=1)


def test_drafter_weights_for_another_width_without_metadata(tmp_path):
    """No metadata to compare: the tensor shapes still refuse it, with a message, not a traceback."""
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


def test_cli_export_bad_options(tmp_path, capsys):
    cases = [
        (["tiny-random", "--out", str(tmp_path / "o1"), "--max-tree-tokens", "0"], r"--max-tree-tokens must be positive"),
        (["tiny-random", "--out", str(tmp_path / "o2"), "--drafter-weights", "bushy=x"],
         r"--drafter-weights expects medusa=PATH, draft=PATH or eagle=PATH, got 'bushy=x'"),
        (["tiny-random", "--out", str(tmp_path / "o3"), "--drafter-weights", "medusa=/nonexistent.safetensors"],
         r"--drafter-weights: /nonexistent.safetensors does not exist"),
    ]
    for argv, pattern in cases:
        code, err = run_in_process("treespec-export", argv, capsys)
        assert code == 2, argv
        assert re.search(pattern, one_error_line(err)), err
    assert not any(tmp_path.iterdir())


# -- --force and where --out may be ------------------------------------------------------------------

def test_force_replaces_only_an_earlier_export_or_an_empty_folder(tiny_artifacts, tmp_path):
    check_output_dir(clone_artifacts(tiny_artifacts, tmp_path / "earlier"), force=True)  # an earlier export
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", force=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "manifest.json").write_text('{"not": "treespec"}')
    with pytest.raises(InputError, match=r"holds files that treespec-export did not write .*--force replaces only "
                                         r"an earlier export or an empty folder"):
        check_output_dir(mine, force=True)
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_force_export_over_a_non_artifact_folder_touches_nothing(tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"did not write"):
        run_export(ExportOptions(model="tiny-random", out=mine, force=True), progress=lambda m: None)
    assert (mine / "sub" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no work folder left either


def test_out_that_can_never_be_the_artifact_directory(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match=r"cannot be a directory: .*a_file is a file"):
        check_output_dir(tmp_path / "a_file" / "sub" / "out", force=False)
    monkeypatch.chdir(tmp_path)
    for out in (Path("."), tmp_path, tmp_path.parent):
        with pytest.raises(InputError, match=r"is the current folder or holds it"):
            check_output_dir(out, force=True)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(InputError, match=r"is a symbolic link"):
        check_output_dir(tmp_path / "link", force=True)


def test_force_replaces_only_a_triton_repository(tmp_path):
    """`treespec-export --triton-repo DIR --force` would replace DIR too: the same rule holds."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"--triton-repo .* holds files that treespec did not write"):
        check_triton_repo_dir(repo, force=True)
    assert (repo / "notes.txt").read_text() == "keep me"
    (repo / STAMP).write_text("{}")  # a repository treespec wrote (tests/test_triton_repo.py writes real ones)
    check_triton_repo_dir(repo, force=True)


# -- CLI, real subprocesses ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cli")
    full = base / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    (base / "a_file").write_text("x")
    here = base / "here"
    here.mkdir()
    (here / "keep.txt").write_text("mine too")
    weights = save_safetensors(base / "medusa-other-vocab.safetensors",
                               {"blocks.0.weight": (64, 64), "blocks.0.bias": (64,)},
                               {"vocab_size": "32000", "hidden_size": "64", "num_heads": "1"})
    return {"base": base, "full": full, "file": base / "a_file", "here": here, "weights": weights}


SUBPROCESS_CASES = {
    # name: (argv built from cli_dirs, message pattern)
    "--out not empty": (lambda d: ["tiny-random", "--out", str(d["full"])],
                        r"is not empty: choose another directory or pass --force"),
    "--force on a folder treespec did not write": (lambda d: ["tiny-random", "--out", str(d["full"]), "--force"],
                                                    r"holds files that treespec-export did not write"),
    "--out is a file": (lambda d: ["tiny-random", "--out", str(d["file"])], r"is a file, not a directory"),
    "--out under a file": (lambda d: ["tiny-random", "--out", str(d["file"] / "out")],
                           r"cannot be a directory: .*a_file is a file"),
    "--out . with --force": (lambda d: ["tiny-random", "--out", ".", "--force"],
                             r"--out \. is the current folder or holds it"),
    "unknown model": (lambda d: ["no-such-model", "--out", str(d["base"] / "out1")], r"unknown model 'no-such-model'"),
    "drafter weights for another vocabulary": (
        lambda d: ["tiny-random", "--out", str(d["base"] / "out2"), "--drafter", "medusa",
                   "--drafter-weights", f"medusa={d['weights']}"],
        r"drafter was trained for vocab_size=32000, the target has 49152"),
}


@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_cli_subprocess(cli_dirs, case):
    argv, pattern = SUBPROCESS_CASES[case]
    result = run_subprocess("treespec-export", *argv(cli_dirs), cwd=cli_dirs["here"])
    assert re.search(pattern, assert_one_line_error(result)), result.stderr[-2000:]
    assert result.stdout.strip() == ""
    assert (cli_dirs["full"] / "keep.txt").read_text() == "mine"
    assert (cli_dirs["here"] / "keep.txt").read_text() == "mine too"
    assert not (cli_dirs["base"] / "out1").exists() and not (cli_dirs["base"] / "out2").exists()
    assert not [p for p in cli_dirs["base"].rglob("*") if ".tmp-" in p.name]  # no leftover work dir


def test_export_and_demo_share_one_default():
    """The README's export command and `treespec demo` write the same folder with the same context."""
    args = export_parser().parse_args(["smollm2-135m", "--out", str(DEMO_ARTIFACTS)])
    assert args.max_context == DEFAULT_MAX_CONTEXT == 2048 and DEMO_ARTIFACTS == Path("artifacts/smollm2")

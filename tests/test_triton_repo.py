"""The Triton model repository writer: configs parse with tritonclient's ModelConfig, shapes match
the graphs, writing is deterministic, and the generated model.py finds treespec on its own."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from treespec.exporter.triton_repo import (ORCHESTRATOR_INPUTS, ORCHESTRATOR_OUTPUTS, STAMP, _onnx_io,
                                           default_repo_dir, ensure_triton_repo, parse_config,
                                           write_triton_repo)
from treespec.errors import ArtifactError, InputError
from treespec.artifacts import load_manifest


def _configs(repo: Path) -> dict:
    return {p.parent.name: parse_config(p.read_text()) for p in sorted(repo.glob("*/config.pbtxt"))}


@pytest.fixture(scope="module")
def tiny_repo(tiny_artifacts, tmp_path_factory) -> Path:
    return write_triton_repo(tiny_artifacts, tmp_path_factory.mktemp("triton") / "repo")


def test_every_config_parses_with_tritonclient_model_config(tiny_artifacts, tiny_repo):
    from tritonclient.grpc import model_config_pb2 as pb

    configs = _configs(tiny_repo)
    assert set(configs) == {"treespec"} | set(load_manifest(tiny_artifacts).graphs)
    cfg = configs["treespec"]
    assert cfg.backend == "python" and cfg.max_batch_size == 0
    assert cfg.model_transaction_policy.decoupled
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    inputs = {i.name: (pb.DataType.Name(i.data_type), list(i.dims), i.optional) for i in cfg.input}
    assert inputs == {n: (t, d, o) for n, t, d, o in ORCHESTRATOR_INPUTS}
    assert {o.name: pb.DataType.Name(o.data_type) for o in cfg.output} == {n: t for n, t, _ in ORCHESTRATOR_OUTPUTS}
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert Path(params["artifact_dir"]).is_absolute() and params["backend"] == "onnxruntime"
    assert all(Path(p).is_dir() for p in json.loads(params["python_path"]))
    assert (tiny_repo / "treespec" / "1" / "model.py").is_file()


def test_graph_model_matches_the_onnx_graph(tiny_artifacts, tiny_repo):
    from tritonclient.grpc import model_config_pb2 as pb

    cfg = _configs(tiny_repo)["target"]
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
    inputs, outputs = _onnx_io(tiny_artifacts / "target.onnx")
    dims = load_manifest(tiny_artifacts).dims
    got = {i.name: (pb.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input}
    assert got == {n: (t, d) for n, t, d in inputs}
    assert got["input_ids"] == ("TYPE_INT64", [-1, -1]) and got["tree_mask"] == ("TYPE_BOOL", [-1, -1, -1])
    assert got["past_key_0"] == ("TYPE_FP32", [-1, dims.num_kv_heads, -1, dims.head_dim])
    out = {o.name: list(o.dims) for o in cfg.output}
    assert out["logits"] == [-1, -1, dims.vocab_size] and set(out) == {n for n, _, _ in outputs}
    version = tiny_repo / "target" / "1"
    assert (version / "model.onnx").resolve() == (tiny_artifacts / "target.onnx").resolve()
    assert (version / "target.onnx.data").exists()  # ONNX Runtime looks for it beside model.onnx


def test_writing_again_changes_nothing_and_other_folders_are_refused(tiny_artifacts, tiny_repo, tmp_path):
    from support.triton_helpers import repo_snapshot

    before = repo_snapshot(tiny_repo)
    write_triton_repo(tiny_artifacts, tiny_repo)  # same artifacts, same options: untouched
    assert ensure_triton_repo(tiny_artifacts, tiny_repo) is True
    assert repo_snapshot(tiny_repo) == before
    with pytest.raises(InputError, match="not empty"):
        write_triton_repo(tiny_artifacts, tiny_repo, instances=2)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("not a repository")
    with pytest.raises(InputError, match="not empty"):
        ensure_triton_repo(tiny_artifacts, other)  # not written by treespec: never replaced
    assert (other / "notes.txt").exists()
    with pytest.raises(InputError, match="is a file"):
        write_triton_repo(tiny_artifacts, other / "notes.txt")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_repo, copy, symlinks=True)
    assert ensure_triton_repo(tiny_artifacts, copy, instances=2) is False  # ours, other options: rewritten
    assert _configs(copy)["treespec"].instance_group[0].count == 2
    assert json.loads((copy / STAMP).read_text())["instances"] == 2


def test_bad_options_and_missing_engines_are_refused(tiny_artifacts, tmp_path):
    with pytest.raises(InputError, match="backend"):
        write_triton_repo(tiny_artifacts, tmp_path / "a", backend="vllm")
    with pytest.raises(InputError, match="device"):
        write_triton_repo(tiny_artifacts, tmp_path / "b", device="tpu")
    with pytest.raises(ArtifactError, match="no full-TensorRT engine"):
        write_triton_repo(tiny_artifacts, tmp_path / "c", backend="tensorrt")
    with pytest.raises(ArtifactError, match="TensorRT-RTX"):
        write_triton_repo(tiny_artifacts, tmp_path / "d", backend="tensorrt-rtx")
    assert not any(tmp_path.iterdir())


def test_drafter_and_default_tree_go_into_the_orchestrator_config(tiny_artifacts, tmp_path):
    with pytest.raises(ArtifactError, match="no 'nope' drafter"):
        write_triton_repo(tiny_artifacts, tmp_path / "a", drafter="nope")
    repo = write_triton_repo(tiny_artifacts, tmp_path / "b", drafter="lookup", tree="chain4")
    params = _configs(repo)["treespec"].parameters
    assert params["drafter"].string_value == "lookup" and params["tree"].string_value == "chain4"


def test_tensorrt_engines_give_tensorrt_plan_models_on_gpus(tiny_artifacts, tmp_path):
    arts = tmp_path / "arts"
    shutil.copytree(tiny_artifacts, arts)
    (arts / "target.tensorrt.engine").write_bytes(b"stand-in plan")
    manifest = json.loads((arts / "manifest.json").read_text())
    manifest["graphs"]["target"]["engines"] = [{"file": "target.tensorrt.engine", "builder": "tensorrt",
                                                "builder_version": "10.13.0",
                                                "profiles": [{"name": name, "batch": [1, 1, 1], "tree_tokens": [1, 8, 64]}
                                                             for name in ("tree", "prefill")]}]
    (arts / "manifest.json").write_text(json.dumps(manifest))
    repo = write_triton_repo(arts, tmp_path / "repo", backend="tensorrt", device="cuda", link="copy")
    from tritonclient.grpc import model_config_pb2 as pb

    configs = _configs(repo)
    assert configs["target"].platform == "tensorrt_plan"
    assert configs["target"].default_model_filename == "model.plan"
    assert configs["target"].instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert list(configs["target"].instance_group[0].profile) == ["0", "1"]  # both engine profiles
    assert configs["treespec"].instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert configs["treespec"].parameters["backend"].string_value == "tensorrt"
    assert (repo / "target" / "1" / "model.plan").read_bytes() == b"stand-in plan"
    assert not (repo / "target" / "1" / "model.plan").is_symlink()
    # an engine holds only the batches of its profiles: more slots are refused before anything is written
    with pytest.raises(InputError, match="batch 1 at most.*--max-batch 2"):
        write_triton_repo(arts, tmp_path / "repo2", backend="tensorrt", device="cuda", batch_slots=2)
    assert not (tmp_path / "repo2").exists()


def test_all_graphs_of_the_smollm2_artifacts(smollm2_artifacts, tmp_path):
    repo = write_triton_repo(smollm2_artifacts, tmp_path / "repo")
    configs = _configs(repo)
    graphs = set(load_manifest(smollm2_artifacts).graphs)
    assert set(configs) == {"treespec"} | graphs
    for name in graphs:
        inputs, outputs = _onnx_io(repo / name / "1" / "model.onnx")
        assert [i.name for i in configs[name].input] == [n for n, _, _ in inputs]
        assert [o.name for o in configs[name].output] == [n for n, _, _ in outputs]
    if "medusa" in configs:
        assert [i.name for i in configs["medusa"].input] == ["hidden_states"]


def test_model_py_finds_treespec_in_an_isolated_interpreter(tiny_repo):
    """The python backend stub ignores PYTHONPATH and has no site-packages of this venv: model.py's
    own path setup must be enough. `python -I -S` reproduces that."""
    model_py = str(tiny_repo / "treespec" / "1" / "model.py")
    config = json.dumps(_config_json(tiny_repo))
    code = (
        "import json, sys\n"
        f"src = open({model_py!r}).read()\n"
        "ns = {}\n"
        "exec(compile(src.split('class TritonPythonModel')[0], 'model.py', 'exec'), ns)\n"
        "try:\n    import treespec\n    sys.exit('treespec importable before the setup')\n"
        "except ImportError:\n    pass\n"
        f"ns['_use_environment'](json.loads({config!r}))\n"
        "import treespec.runtime.api, numpy, onnxruntime\n"
        "print(treespec.__file__)\n"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout
    import treespec

    assert Path(done.stdout.strip()).resolve() == Path(treespec.__file__).resolve()


def _config_json(repo: Path) -> dict:
    """The model config as Triton hands it to the python model (parameters -> string_value)."""
    from google.protobuf import json_format

    cfg = parse_config((repo / "treespec" / "config.pbtxt").read_text())
    return json_format.MessageToDict(cfg, preserving_proto_field_name=True)


def test_default_repo_dir_is_per_artifacts_and_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    a = default_repo_dir(tmp_path / "arts")
    assert a.parent == tmp_path / "triton" and a.name.startswith("arts-")
    assert a != default_repo_dir(tmp_path / "arts", device="cuda") != default_repo_dir(tmp_path / "other")


def test_stub_hides_numpy2_only_packages(tmp_path, monkeypatch):
    """The stub imports numpy<2; in an environment whose numpy is 2 (the H200 image) scipy cannot load
    under it, and transformers imports it when it is found: repo_model.py marks it absent there only."""
    import importlib.util
    import types
    spec = importlib.util.spec_from_file_location("repo_model_under_test",
                                                  Path(__file__).parents[1] / "runtime/triton/repo_model.py")
    repo_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repo_model)
    env = tmp_path / "site-packages"
    (env / "numpy-2.5.2.dist-info").mkdir(parents=True)
    for name in repo_model.NUMPY2_ONLY:
        monkeypatch.delitem(sys.modules, name, raising=False)
    repo_model._hide_numpy2_only_packages([str(env)])  # numpy 2 loaded (this test's): nothing hidden
    assert all(name not in sys.modules for name in repo_model.NUMPY2_ONLY)
    monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__="1.26.4"))
    repo_model._hide_numpy2_only_packages([str(tmp_path)])  # the environment has no numpy 2 either
    assert all(name not in sys.modules for name in repo_model.NUMPY2_ONLY)
    repo_model._hide_numpy2_only_packages([str(env)])
    for name in repo_model.NUMPY2_ONLY:
        assert sys.modules[name] is None and importlib.util.find_spec(name) is None
        monkeypatch.delitem(sys.modules, name)

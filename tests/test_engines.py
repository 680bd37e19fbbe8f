"""TensorRT-RTX engines built on the CPU from exported tree graphs; records and refusals.

TensorRT-RTX (tensorrt-rtx-cu13-bindings) builds ahead of time without a GPU, so CI builds real
engines here, through Polygraphy's loaders as the exporter does. Running them needs a GPU TensorRT-RTX supports, which this project has none of: the
backend is exercised up to the point where it would deserialize (the checks before it, and its
refusal without a GPU). Build times and sizes are printed (pytest -s shows them).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("tensorrt_rtx_bindings", reason="tensorrt-rtx-cu13-bindings is not installed")

from support.tiny_tree_graphs import write_tiny_artifacts  # noqa: E402

from treespec.exporter.engine_profiles import (  # noqa: E402
    EngineProfile, input_shapes, profiles_for_graph, tree_profile)
from treespec.artifacts import Manifest, load_manifest  # noqa: E402
from treespec.exporter.engines import build_artifact_engines, build_engines  # noqa: E402
from treespec.errors import BackendError  # noqa: E402
from treespec.engine_record import (  # noqa: E402
    RECORD_KEYS, check_engine, read_sidecar, sha256_of)
from treespec.trt_api import RTX_DEFAULT_CCS, TrtApi  # noqa: E402
from treespec.errors import ArtifactError, InputError  # noqa: E402

RTX = "tensorrt-rtx"


def stage(src: Path, dst: Path) -> Path:
    """A writable view of an artifact directory: manifest copied, everything else symlinked."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name == "manifest.json":
            shutil.copyfile(item, dst / item.name)
        elif not (dst / item.name).exists():
            (dst / item.name).symlink_to(item.resolve())
    return dst


def report(manifest: Manifest, label: str) -> None:
    for name, entry in manifest.graphs.items():
        for rec in entry.engines:
            print(f"[engines] {label} {name}: {rec.builder} {rec.builder_version} {rec.precision} "
                  f"built in {rec.build_seconds:.2f} s, {rec.size_bytes / 1e6:.1f} MB")


def check_records(root: Path, manifest: Manifest, precision: str, graphs: list[str] | None = None) -> None:
    """The records of `manifest` (as built) are those on disk (manifest.json, sidecars) and describe
    the engine files: builder, version, precision, profiles from the graph's, size and SHA-256."""
    version = TrtApi.load(RTX).version
    on_disk = load_manifest(root)
    for name in graphs or list(manifest.graphs):
        entry = manifest.graphs[name]
        rec = entry.engine(RTX)
        assert rec is not None and rec.to_dict() == on_disk.graphs[name].engine(RTX).to_dict()
        record = rec.to_dict()
        assert set(RECORD_KEYS) <= set(record)
        assert rec.builder_version == version and rec.precision == precision
        assert record["precision_source"] == "onnx"
        assert rec.compute_capabilities == RTX_DEFAULT_CCS
        assert (rec.profiles[0].batch, rec.profiles[0].tree_tokens) == (entry.profile.batch, entry.profile.tree_tokens)
        path = root / rec.file
        blob = path.read_bytes()
        assert rec.size_bytes == len(blob) > 0 and rec.sha256 == sha256_of(blob)
        assert read_sidecar(path) == record
        assert check_engine(path, record) == blob


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory) -> Path:
    """Target, draft and Medusa graphs (fp16) with RTX engines."""
    root = tmp_path_factory.mktemp("tiny-fp16")
    write_tiny_artifacts(root, "fp16")
    manifest = build_artifact_engines(root, RTX, "fp16", progress=lambda msg: None)
    report(manifest, "tiny fp16")
    return root


def test_rtx_engines_for_target_draft_and_medusa(tiny_fp16):
    manifest = load_manifest(tiny_fp16)
    assert set(manifest.graphs) == {"target", "draft", "medusa"}
    check_records(tiny_fp16, manifest, "fp16")
    assert manifest.graphs["medusa"].engines[0].profiles[0].past is None
    assert manifest.graphs["target"].engines[0].runtime_cache == "target.tensorrt-rtx.runtime-cache"


def test_rebuild_replaces_the_builders_record(tiny_fp16, tmp_path):
    root = stage(tiny_fp16, tmp_path / "a")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["graphs"]["medusa"]["engines"].append({"builder": "tensorrt", "file": "medusa.tensorrt.engine"})
    build_engines(root, manifest, RTX, graphs=["medusa"])
    builders = [r["builder"] for r in manifest["graphs"]["medusa"]["engines"]]
    assert sorted(builders) == ["tensorrt", RTX]


def test_lead_pipeline_fp32_graph(tiny_artifacts, tmp_path):
    """The exporter's own tiny-random Llama (decomposed attention, fp32)."""
    root = stage(tiny_artifacts, tmp_path / "tiny")
    manifest = build_artifact_engines(root, RTX, "fp32", graphs=["target"])
    report(manifest, "tiny-random fp32 decomposed")
    check_records(root, manifest, "fp32", graphs=["target"])


def test_opset23_attention_is_marked_decomposable(tiny_artifacts_onnx_attention, tmp_path):
    """fp32 IAttention has no fused TensorRT-RTX kernel: the build succeeds only once marked."""
    root = stage(tiny_artifacts_onnx_attention, tmp_path / "tiny-onnx")
    manifest = build_artifact_engines(root, RTX, graphs=["target"])
    report(manifest, "tiny-random fp32 opset-23 Attention")
    record = manifest.graphs["target"].engine(RTX)
    assert record is not None and record.extras["attention_decomposable"] == manifest.dims.num_layers


def test_precision_must_match_the_onnx(tiny_fp16, tmp_path):
    root = stage(tiny_fp16, tmp_path / "p")
    with pytest.raises(ArtifactError, match="is fp16 .* but fp32 engines were asked.*re-export"):
        build_artifact_engines(root, RTX, "fp32", graphs=["medusa"])


def test_prefill_profile_and_compute_capabilities(tiny_fp16, tmp_path):
    root = stage(tiny_fp16, tmp_path / "cc")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["graphs"]["target"]["prefill_tokens"] = 64
    build_engines(root, manifest, RTX, "fp16", ["sm_86", "12.0"], graphs=["target"])
    record = manifest["graphs"]["target"]["engines"][0]
    assert record["compute_capabilities"] == ["8.6", "12.0"]
    assert [p["name"] for p in record["profiles"]] == ["tree", "prefill"]
    assert record["profiles"][1]["tree_tokens"] == [1, 64, 64]
    with pytest.raises(InputError, match="cannot target compute capability 9.0"):
        build_engines(root, manifest, RTX, compute_capabilities=["9.0"], graphs=["medusa"])


def test_build_goes_through_polygraphy_quietly(tiny_fp16, tmp_path, capsys):
    """Polygraphy's TensorRT loaders drive the installed TensorRT-RTX module (registered as
    `tensorrt_rtx`); its log and TensorRT's stay off stdout and stderr during a build."""
    api = TrtApi.load(RTX)
    poly = api.polygraphy()
    assert poly.loaders.loader.trt.Builder is api.module.Builder
    assert poly.create_config.__name__ == "CreateConfigRTX"
    root = stage(tiny_fp16, tmp_path / "q")
    capsys.readouterr()
    build_artifact_engines(root, RTX, graphs=["medusa"])
    out = capsys.readouterr()
    assert out.out == "" and out.err == "", out


def test_unparsable_onnx_quotes_the_parser_once(tiny_fp16, tmp_path):
    root = stage(tiny_fp16, tmp_path / "bad")
    truncated = (root / "medusa.onnx").read_bytes()[:3000]
    (root / "medusa.onnx").unlink()
    (root / "medusa.onnx").write_bytes(truncated)
    with pytest.raises(ArtifactError, match="tensorrt-rtx 1.7.1.* cannot parse medusa.onnx: .*Failed to parse") as err:
        build_artifact_engines(root, RTX, graphs=["medusa"])
    assert str(err.value).count("MODEL_DESERIALIZE_FAILED") == 1, err.value


def test_plugin_graphs_need_full_tensorrt(tiny_fp16, tmp_path):
    root = stage(tiny_fp16, tmp_path / "pl")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["graphs"]["target"]["attention"] = "plugin"
    with pytest.raises(ArtifactError, match="no plugin API"):
        build_engines(root, manifest, RTX, graphs=["target"])


# -- refusals: each names the builder and version that made the engine ------------------------------

def _copy_engine(root: Path, tmp_path: Path, graph: str = "target") -> tuple[Path, dict]:
    record = json.loads((root / "manifest.json").read_text())["graphs"][graph]["engines"][0]
    path = tmp_path / record["file"]
    shutil.copyfile(root / record["file"], path)
    shutil.copyfile(root / (record["file"] + ".json"), tmp_path / (record["file"] + ".json"))
    return path, record


def _names_maker(message: str, record: dict) -> None:
    assert f"{record['builder']} {record['builder_version']}" in message, message


def test_truncated_engine_is_refused(tiny_fp16, tmp_path):
    path, record = _copy_engine(tiny_fp16, tmp_path)
    path.write_bytes(path.read_bytes()[: record["size_bytes"] // 2])
    with pytest.raises(ArtifactError, match="corrupt") as err:
        check_engine(path, record)
    _names_maker(str(err.value), record)
    with pytest.raises(ArtifactError, match="corrupt"):  # the sidecar is the record when none is given
        check_engine(path)


def test_altered_engine_is_refused(tiny_fp16, tmp_path):
    path, record = _copy_engine(tiny_fp16, tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256") as err:
        check_engine(path, record)
    _names_maker(str(err.value), record)


def test_engine_of_another_version_is_refused(tiny_fp16, tmp_path):
    path, record = _copy_engine(tiny_fp16, tmp_path)
    older = {**record, "builder_version": "1.6.0.17"}
    with pytest.raises(ArtifactError, match="installed tensorrt-rtx 1.7.1") as err:
        check_engine(path, older)
    _names_maker(str(err.value), older)


def test_engine_of_another_builder_is_refused(tiny_fp16, tmp_path):
    path, record = _copy_engine(tiny_fp16, tmp_path)
    other = {**record, "builder": "tensorrt", "builder_version": "10.13.0.35"}
    with pytest.raises(ArtifactError, match="not installed") as err:
        check_engine(path, other)
    _names_maker(str(err.value), other)


def test_engine_this_machine_cannot_load_is_refused(tiny_fp16, tmp_path):
    """deserialize=True asks TensorRT-RTX itself; with no supported GPU here it must refuse cleanly."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: whether RTX can load the engine depends on it")
    path, record = _copy_engine(tiny_fp16, tmp_path)
    with pytest.raises(ArtifactError, match="cannot run here|could not be deserialized") as err:
        check_engine(path, record, deserialize=True)
    _names_maker(str(err.value), record)


def test_engine_without_record_is_refused(tiny_fp16, tmp_path):
    path, _ = _copy_engine(tiny_fp16, tmp_path)
    Path(str(path) + ".json").unlink()
    with pytest.raises(ArtifactError, match="no record"):
        check_engine(path)


def test_backend_checks_the_engine_before_anything_else(tiny_fp16, tmp_path):
    torch = pytest.importorskip("torch")
    from treespec.runtime.backends.tensorrt import TensorRTBackend

    path, record = _copy_engine(tiny_fp16, tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="corrupt") as err:
        TensorRTBackend(path, record)
    _names_maker(str(err.value), record)
    if not torch.cuda.is_available():
        (tmp_path / "good").mkdir()
        good, good_record = _copy_engine(tiny_fp16, tmp_path / "good")
        with pytest.raises(BackendError, match="needs a CUDA GPU"):
            TensorRTBackend(good, good_record)


def test_commit_moves_only_accepted_rows():
    import torch

    from treespec.runtime.backends.tensorrt import move_rows

    layers2, batch, heads, cap, dim, tokens, tmax = 4, 2, 2, 7, 3, 5, 8
    kv = torch.zeros(layers2, batch, heads, cap, dim)
    new = torch.randn(layers2, batch * heads * tmax * dim)
    index = torch.tensor([[0, 0, 1], [2, 4, 1], [3, 4, 0]])  # (sequence, tree row, cache row)
    expected = kv.clone()
    rows = new[:, : batch * heads * tokens * dim].view(layers2, batch, heads, tokens, dim)
    for b, src, dst in index.T.tolist():
        expected[:, b, :, dst] = rows[:, b, :, src]
    move_rows(kv, new, batch, tokens, index)
    assert torch.equal(kv, expected)


# -- profiles ----------------------------------------------------------------------------------------

def test_profiles_from_tree_and_context():
    entry = {"profile": tree_profile(tree_tokens=69, max_context=2048, max_batch=4), "prefill_tokens": 512}
    tree, prefill = profiles_for_graph("target", entry)
    assert tree == EngineProfile("tree", (1, 1, 4), (1, 69, 69), (1, 2048, 2048))
    assert prefill.tree_tokens == (1, 512, 512)
    assert input_shapes("tree_mask", [-1, -1, -1], tree) == ([1, 1, 1], [1, 69, 69], [4, 69, 69])
    assert input_shapes("past_value_3", [-1, 3, -1, 64], tree) == ([1, 3, 1, 64], [1, 3, 2048, 64], [4, 3, 2048, 64])
    assert input_shapes("hidden_states", [-1, -1, 576], tree)[2] == [4, 69, 576]
    assert profiles_for_graph("medusa", entry) == [tree]
    with pytest.raises(ArtifactError, match="not part of the tree-graph contract"):
        input_shapes("attention_mask", [-1, -1], tree)
    with pytest.raises(ArtifactError, match="min <= opt <= max"):
        profiles_for_graph("target", {"profile": {"batch": [2, 1, 4], "tree_tokens": [1, 1, 1], "past": [1, 1, 1]}})


@pytest.mark.slow
def test_smollm2_engines(smollm2_artifacts, tmp_path):
    """Every graph the SmolLM2 export has (target, and draft/medusa when exported) gets an engine."""
    root = stage(smollm2_artifacts, tmp_path / "smollm2")
    precision = load_manifest(root).graphs["target"].precision
    manifest = build_artifact_engines(root, RTX, precision, progress=print)
    report(manifest, "SmolLM2-135M")
    check_records(root, manifest, precision)

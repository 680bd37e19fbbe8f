"""Session fixtures: every model is exported once per test run and shared by all tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "tests" / "data" / "bench.jsonl"
ALL_DRAFTERS = ["lookup", "medusa", "draft"]


def _export(out: Path, model: str, **kwargs) -> Path:
    from treespec.exporter.pipeline import ExportOptions, run_export

    run_export(ExportOptions(model=model, out=out, force=True, **kwargs), progress=lambda m: None)
    return out


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def tiny_artifacts(artifacts_root) -> Path:
    """Tiny random Llama (GQA, untied embeddings), decomposed attention, every drafter (untrained)."""
    return _export(artifacts_root / "tiny", "tiny-random", max_context=256, drafters=ALL_DRAFTERS)


@pytest.fixture(scope="session")
def tiny_artifacts_onnx_attention(artifacts_root) -> Path:
    return _export(artifacts_root / "tiny-onnx", "tiny-random", attention="onnx", max_context=256)


@pytest.fixture(scope="session")
def smollm2_artifacts(artifacts_root) -> Path:
    """SmolLM2-135M-Instruct, fp32, decomposed attention, the committed trained drafters."""
    prebuilt = os.environ.get("TREESPEC_TEST_SMOLLM2")
    if prebuilt:
        return Path(prebuilt)
    return _export(artifacts_root / "smollm2", "smollm2-135m", max_context=1024, drafters=ALL_DRAFTERS)


@pytest.fixture(scope="session")
def smollm2_artifacts_onnx_attention(artifacts_root) -> Path:
    return _export(artifacts_root / "smollm2-onnx", "smollm2-135m", attention="onnx", max_context=1024)


@pytest.fixture(scope="session")
def bench_prompts():
    from treespec.runtime.prompts import read_prompts

    return read_prompts(BENCH)


@pytest.fixture(scope="session")
def tiny_hf():
    from treespec.models.checkpoint import load_checkpoint

    return load_checkpoint("tiny-random")


@pytest.fixture(scope="session")
def smollm2_hf():
    from treespec.models.checkpoint import load_checkpoint

    return load_checkpoint("smollm2-135m")

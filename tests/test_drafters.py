"""Medusa and draft-LM drafters: export parity, losslessness, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from support.parity import backend_tree_logits, hf_tree_logits, random_tree
from treespec.artifacts import load_manifest
from treespec.runtime.api import SpeculativeGenerator

TREES = {
    "lookup": ["opt32"],
    "medusa": ["medusa-default", {"policy": "widths", "widths": [4, 8, 8, 8]}],
    "draft": [{"policy": "widths", "widths": [4, 8, 8, 8, 8]}, "opt32"],
}


def test_medusa_graph_matches_pytorch(tiny_artifacts, tiny_hf):
    import onnxruntime as ort

    from treespec.models.drafter_models import medusa_from_weights

    heads = medusa_from_weights(tiny_hf.model, None)
    torch.manual_seed(0)
    with torch.no_grad():  # the exported heads are zero-initialised: give the check real weights
        for block in heads.blocks:
            block.weight.normal_(0, 0.1)
            block.bias.normal_(0, 0.1)
    from treespec.exporter.drafter_export import export_medusa_graph

    path = export_medusa_graph(heads, tiny_artifacts.parent / "medusa-parity" / "medusa.onnx", "fp32")
    hidden = torch.randn(2, 5, tiny_hf.model.config.hidden_size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, logprobs, logits = session.run(None, {"hidden_states": hidden.numpy()})
    with torch.no_grad():
        want = heads.head_logits(hidden).numpy()
    assert np.abs(logits - want).max() < 1e-3
    assert (ids[..., 0] == want.argmax(-1)).all()


def test_draft_graph_matches_pytorch(tiny_artifacts, tiny_hf, monkeypatch):
    from treespec.models.drafter_models import draft_from_weights
    from treespec.runtime.loader import load_graph

    # the exported fp32 graph itself, not the int8 copy the CPU loader makes of drafter graphs (whose
    # quantizer may or may not take a graph: a run here quantized it, and its logits differ by ~0.1)
    monkeypatch.setenv("TREESPEC_DRAFTER_INT8", "0")
    manifest = load_manifest(tiny_artifacts)
    backend = load_graph(manifest, "draft", "onnxruntime", "cpu")
    draft = draft_from_weights(tiny_hf.model, None)
    draft.config._attn_implementation = "eager"
    rng = np.random.default_rng(5)
    worst = 0.0
    for size in (1, 17, 40):
        prefix = [int(t) for t in rng.integers(0, manifest.dims.vocab_size, 11)]
        tree = random_tree(rng, size, manifest.dims.vocab_size)
        worst = max(worst, float(np.abs(backend_tree_logits(backend, prefix, tree)
                                        - hf_tree_logits(draft, prefix, tree)).max()))
    assert worst < 1e-3


@pytest.mark.parametrize("drafter", ["lookup", "medusa", "draft"])
def test_tiny_lossless_each_drafter(tiny_artifacts, bench_prompts, drafter):
    gen = SpeculativeGenerator.from_artifacts(tiny_artifacts, drafter=drafter)
    prompts = bench_prompts[:6]
    plain = [gen.generate(p, max_new_tokens=32, tree="none").token_ids for p in prompts]
    for tree in TREES[drafter]:
        assert [gen.generate(p, max_new_tokens=32, tree=tree).token_ids for p in prompts] == plain


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["medusa", "draft", "lookup"])
def test_smollm2_lossless_each_drafter(smollm2_artifacts, bench_prompts, drafter):
    gen = SpeculativeGenerator.from_artifacts(smollm2_artifacts, drafter=drafter)
    prompts = bench_prompts[:20]
    accepted = []
    for prompt in prompts:
        want = gen.generate(prompt, max_new_tokens=40, tree="none").token_ids
        # the manifest's tree: the CPU default is sized per step and may plan plain steps
        # (tests/test_cpu_default_trees.py); this test is about the trained drafters' acceptance
        got = gen.generate(prompt, max_new_tokens=40, tree=gen.manifest.default_tree(drafter))
        assert got.token_ids == want, prompt
        accepted.append(got.stats["mean_accepted"])
    print(f"{drafter}: mean accepted tokens/step {np.mean(accepted):.2f}")
    if drafter in ("medusa", "draft"):  # the committed drafters are trained: they must help
        assert np.mean(accepted) > 1.5


def test_training_lowers_distillation_loss(tmp_path):
    from treespec.exporter.distill_train import TrainOptions, train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import json as json_module

    (corpus / "a.py").write_text(open(json_module.__file__).read())
    for kind in ("medusa", "draft"):
        summary = train(TrainOptions(kind=kind, model="tiny-random", out=tmp_path / f"{kind}.safetensors",
                                     corpus=[corpus], sequences=4, new_tokens=12, generate_batch=4,
                                     steps=25, batch_size=4, lr=3e-3, num_layers=1, checkpoint_every=10))
        assert summary["final_loss"] < summary["first_loss"] - 0.05, summary
        assert (tmp_path / f"{kind}.safetensors").stat().st_size > 0

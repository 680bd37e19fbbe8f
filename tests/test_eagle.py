"""The EAGLE drafter on the CPU: lossless for every tree policy, eagle.onnx parity, the device
EAGLE-2 draft equal to the eagle2 policy, and speculative sampling with it still follows the target;
all of it again (but every policy) for a head with a draft vocabulary (EAGLE-3's).

Real parts throughout: a tiny random Llama exported with `--drafter eagle` (an untrained head from
the target: a real drafter, mostly rejected, sometimes accepted), ONNX Runtime and torch (CPU, no
graph capture) backends, the real policies and verifier. The draft vocabulary is built by
exporter/eagle_vocab.py from the target's plain answers to the bench prompts, small enough that
some of the target's tokens fall outside it. The GPU half is tests/test_eagle_gpu.py.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from support.tree_checks import POLICY_TREES
from support.vocab8 import vocab8_backend, vocab8_model
from test_sampling_distribution import (GENERATED, PROMPT, VOCAB, chi_square_p, exact_distribution, full_tree,
                                        sampled_run)
from treespec.artifacts import load_manifest
from treespec.errors import ArtifactError
from treespec.exporter import eagle_data
from treespec.exporter.eagle_export import INPUT_NAMES, OUTPUT_NAMES
from treespec.exporter.eagle_vocab import build_draft_vocab
from treespec.exporter.pipeline import ExportOptions, run_export
from treespec.models.eagle import eagle_from_weights, eagle_metadata, make_eagle_head, save_eagle
from treespec.runtime.api import SpeculativeGenerator
from treespec.runtime.backends.base import StepInputs
from treespec.runtime.backends.onnxruntime import OnnxRuntimeBackend, open_session
from treespec.runtime.drafters.base import Features
from treespec.runtime.drafters.eagle import EagleDrafter
from treespec.runtime.drafters.eagle_torch import TorchEagleDrafter, TorchEagleHead
from treespec.runtime.generator import TreeGenerator
from treespec.runtime.loader import load_graph, load_hf_model
from treespec.runtime.trees.policies import draft_trees, parse_tree_config
from treespec.runtime.trees.tree import Tree, batch_tree_inputs, chain_tree
from treespec.runtime.verify import SamplingParams

NEW_TOKENS = 12
DRAFT_VOCAB = 96  # of the 165 distinct tokens of the 20 plain answers
POLICY_TREES = {"eagle2": "eagle2-d4-k4-n16",
                "eagle2-wide": {"policy": "eagle2", "depth": 3, "top_k": 6, "budget": 24}, **POLICY_TREES}


@pytest.fixture(scope="module")
def eagle_artifacts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eagle") / "tiny"
    run_export(ExportOptions(model="tiny-random", out=out, max_context=256, drafters=["eagle"]), progress=lambda m: None)
    return out


@pytest.fixture(scope="module")
def ort_gen(eagle_artifacts):
    gen = SpeculativeGenerator.from_artifacts(eagle_artifacts, "onnxruntime", "cpu", drafter="eagle", threads=1)
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def bench_ids(ort_gen, bench_prompts):
    """20 bench prompts as ids, and each decoded alone with --tree none."""
    ids = [ort_gen.encode(p) for p in bench_prompts[:20]]
    assert len(ids) == 20 and len({len(i) for i in ids}) > 5
    alone = [ort_gen.generate(i, max_new_tokens=NEW_TOKENS, tree="none").token_ids for i in ids]
    return ids, alone


@pytest.fixture(scope="module")
def vocab_artifacts(tmp_path_factory, tiny_hf, bench_ids) -> tuple[Path, np.ndarray]:
    """The tiny export with an untrained head over a DRAFT_VOCAB-token draft vocabulary: the most
    frequent tokens of the target's plain answers to the 20 bench prompts, EOS kept."""
    ids, alone = bench_ids
    data = eagle_data.pack([p + a for p, a in zip(ids, alone)], [len(p) for p in ids], [0] * len(ids),
                           [eagle_data.SPLIT_TRAIN] * len(ids))
    target = tiny_hf.model
    vocab, _ = build_draft_vocab(data, DRAFT_VOCAB, target.config.vocab_size, tiny_hf.tokenizer.eos_token_id)
    torch.manual_seed(0)
    head = make_eagle_head(target).use_draft_vocab(torch.from_numpy(vocab))
    folder = tmp_path_factory.mktemp("eagle-vocab")
    save_eagle(head, folder / "eagle.safetensors", eagle_metadata(target.config))
    run_export(ExportOptions(model="tiny-random", out=folder / "tiny", max_context=256, drafters=["eagle"],
                             drafter_weights={"eagle": folder / "eagle.safetensors"}), progress=lambda m: None)
    return folder / "tiny", vocab


@pytest.fixture(scope="module")
def ort_vocab_gen(vocab_artifacts):
    gen = SpeculativeGenerator.from_artifacts(vocab_artifacts[0], "onnxruntime", "cpu", drafter="eagle", threads=1)
    yield gen
    gen.close()


def _batched(gen, ids, tree, batch: int = 8) -> tuple[list[list[int]], list[float]]:
    out, accepted = [], []
    for i in range(0, len(ids), batch):
        out += [r.token_ids for r in gen.generate_batch(ids[i:i + batch], max_new_tokens=NEW_TOKENS, tree=tree)]
        accepted += gen.engine.stats.accepted
    return out, accepted


@pytest.mark.parametrize("policy", list(POLICY_TREES))
def test_eagle_lossless_every_policy_20_prompts_batched(ort_gen, bench_ids, policy):
    ids, alone = bench_ids
    tree = POLICY_TREES[policy]
    got, accepted = _batched(ort_gen, ids, tree)
    assert got == alone, policy
    stats = ort_gen.engine.stats.as_dict()
    assert stats["lossless"] and stats["tree_policy"] == ort_gen.resolve_tree(tree).policy
    assert max(stats["mean_tree_size"], 0) <= ort_gen.resolve_tree(tree).max_nodes


def test_eagle_drafts_are_sometimes_accepted(ort_gen, bench_ids):
    """The acceptance path (several rows committed, the head fed several features) is exercised."""
    ids, alone = bench_ids
    got, accepted = _batched(ort_gen, ids, "eagle2-d4-k4-n16")
    assert got == alone
    assert max(accepted) >= 2, "no drafted token was ever accepted: the test would not test acceptance"


@pytest.mark.parametrize("policy", ["eagle2", "eagle2-wide", "opt"])
def test_eagle_draft_vocab_lossless_20_prompts_batched(ort_vocab_gen, bench_ids, vocab_artifacts, policy):
    """A head over a draft vocabulary that misses some of the target's tokens: the same output."""
    ids, alone = bench_ids
    assert not {t for a in alone for t in a} <= set(vocab_artifacts[1].tolist())  # some are outside it
    got, accepted = _batched(ort_vocab_gen, ids, POLICY_TREES[policy])
    assert got == alone, policy
    assert ort_vocab_gen.engine.stats.as_dict()["lossless"]
    if policy == "eagle2":
        assert max(accepted) >= 2, "no drafted token was ever accepted: the subset's mapping is not tested"


@pytest.mark.parametrize("vocab", [False, True], ids=["full", "draft-vocab"])
@pytest.mark.parametrize("backend,tree", [("torch", "eagle2-d4-k4-n16"), ("torch", "opt32"),
                                          ("onnxruntime-device", "eagle2-d4-k4-n16")])
def test_eagle_other_backends_lossless(request, bench_ids, backend, tree, vocab):
    """The torch drafter (eagle2 through the device draft, eager on the CPU; opt through expand),
    and eagle.onnx behind the ONNX Runtime device-buffer target backend (its CPU run)."""
    ids, alone = bench_ids
    artifacts = request.getfixturevalue("vocab_artifacts")[0] if vocab else request.getfixturevalue("eagle_artifacts")
    gen = SpeculativeGenerator.from_artifacts(artifacts, backend, "cpu", drafter="eagle")
    assert isinstance(gen.drafter, TorchEagleDrafter) == (backend == "torch")
    assert (gen.drafter.vocab is not None) == vocab
    got = [r.token_ids for r in gen.generate_batch(ids[:3], max_new_tokens=NEW_TOKENS, tree=tree)]
    assert got == alone[:3]


def test_torch_target_verifies_eagle2_trees_on_the_device(eagle_artifacts, bench_ids):
    """With the torch target the EAGLE-2 draft's trees are verified where they were drafted
    (TreeBackend.step_device; the host builds its trees meanwhile): the same tokens as with host
    trees and as plain decoding, batch 3 (sequences finish at different steps)."""
    ids, alone = bench_ids
    gen = SpeculativeGenerator.from_artifacts(eagle_artifacts, "torch", "cpu", drafter="eagle")
    calls = []
    step_device = gen.target.step_device
    gen.target.step_device = lambda *args: calls.append(1) or step_device(*args)
    on_device = [r.token_ids for r in gen.generate_batch(ids[:3], max_new_tokens=NEW_TOKENS, tree="eagle2-d4-k4-n16")]
    steps = gen.engine.stats.steps
    gen.target.device_trees = False
    on_host = [r.token_ids for r in gen.generate_batch(ids[:3], max_new_tokens=NEW_TOKENS, tree="eagle2-d4-k4-n16")]
    assert len(calls) == steps > 0
    assert on_device == on_host == alone[:3]


def test_bench_host_trees_rows(eagle_artifacts, tmp_path):
    """`treespec bench --host-trees`: each EAGLE-2 row twice, trees verified on the device and trees
    the host built, both lossless (the comparison the GPU runs make in one process)."""
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "treespec.runtime.cli", "bench", "--artifacts", str(eagle_artifacts),
                    "--num-prompts", "2", "--max-new-tokens", "12", "--device", "cpu", "--backends", "torch",
                    "--drafters", "eagle", "--trees", "eagle2-d4-k4-n16", "--baselines", "ar", "--no-curves",
                    "--host-trees", "--json", str(out)], check=True, capture_output=True, timeout=600)
    rows = [c for c in json.loads(out.read_text())["configs"] if c["drafter"] == "eagle"]
    assert [(r["name"].endswith("host trees"), r["device_trees"]) for r in rows] == [(False, True), (True, False)]
    assert all(r["lossless"] for r in rows)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_eagle_drafts_only_draft_vocab_ids(eagle_artifacts, vocab_artifacts, bench_ids, backend):
    """Every drafted token (the device eagle2 draft on torch, expand on ONNX Runtime) is a target id
    of the draft vocabulary; the old head (no draft_vocab in its file or entry) drafts over all."""
    folder, vocab = vocab_artifacts
    assert load_manifest(folder).drafter("eagle").draft_vocab == DRAFT_VOCAB
    assert load_manifest(eagle_artifacts).drafter("eagle").draft_vocab is None
    cfg = parse_tree_config({"policy": "eagle2", "depth": 3, "top_k": 4, "budget": 12})
    drafted = {}
    for name, artifacts in (("vocab", folder), ("full", eagle_artifacts)):
        drafter = SpeculativeGenerator.from_artifacts(artifacts, backend, "cpu", drafter="eagle").drafter
        assert (drafter.vocab is None) == (name == "full")
        target = load_graph(load_manifest(artifacts), "target", "torch", "cpu")
        drafted[name] = {t for tree in _draft(drafter, target, bench_ids[0][:3], cfg) for t in tree.tokens[1:]}
    assert drafted["vocab"] <= set(vocab.tolist()) and len(drafted["vocab"]) > 4
    assert not drafted["full"] <= set(vocab.tolist())


def test_eagle_draft_vocab_must_match_the_manifest(vocab_artifacts, tmp_path):
    """An entry whose K differs from the weights' draft_vocab, or that omits it while eagle.onnx's
    logits are over K ids, is refused with one line, not drafted with ids that mean other tokens."""
    for k, message in ((DRAFT_VOCAB + 1, "draft vocabulary of 97 ids"), (None, "vocabulary of 96")):
        folder = tmp_path / f"k{k}"
        shutil.copytree(vocab_artifacts[0], folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["drafters"]["eagle"]["draft_vocab"] = k
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match=message):
            SpeculativeGenerator.from_artifacts(folder, "onnxruntime", "cpu", drafter="eagle")


@pytest.mark.parametrize("vocab", [False, True], ids=["full", "draft-vocab"])
def test_eagle_onnx_parity(request, vocab):
    """eagle.onnx (ONNX Runtime) against the PyTorch head from the shipped weights: within 1e-3
    (logits over the draft vocabulary's K ids when the head has one)."""
    artifacts = request.getfixturevalue("vocab_artifacts")[0] if vocab else request.getfixturevalue("eagle_artifacts")
    manifest = load_manifest(artifacts)
    head = eagle_from_weights(load_hf_model(manifest, "cpu"), manifest.require_file(manifest.drafter("eagle").weights))
    assert head.lm_head.out_features == (DRAFT_VOCAB if vocab else manifest.dims.vocab_size)
    session = open_session(manifest.require_file(manifest.graph("eagle").onnx))
    assert [i.name for i in session.get_inputs()] == INPUT_NAMES
    dims, gen = manifest.dims, torch.Generator().manual_seed(0)
    batch, tokens, capacity = 2, 5, 9
    feed = {
        "hidden_states": torch.randn(batch, tokens, dims.hidden_size, generator=gen),
        "input_ids": torch.randint(0, dims.vocab_size, (batch, tokens), generator=gen),
        "position_ids": torch.tensor([[4, 5, 5, 6, 7], [2, 3, 4, 4, 5]]),
        "tree_mask": torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0],
                                   [1, 1, 0, 1, 1]], dtype=torch.bool).repeat(batch, 1, 1),
        "past_lengths": torch.tensor([4, 2]),
        "past_key_0": torch.randn(batch, dims.num_kv_heads, capacity, dims.head_dim, generator=gen),
        "past_value_0": torch.randn(batch, dims.num_kv_heads, capacity, dims.head_dim, generator=gen),
    }
    with torch.no_grad():
        want = [t.float().numpy() for t in head(*feed.values())]
    got = session.run(OUTPUT_NAMES, {k: v.numpy() for k, v in feed.items()})
    for name, w, g in zip(OUTPUT_NAMES, want, got):
        np.testing.assert_allclose(g, w, atol=1e-3, rtol=0, err_msg=name)


@pytest.mark.parametrize("vocab", [False, True], ids=["full", "draft-vocab"])
def test_device_eagle2_draft_equals_the_eagle2_policy(request, bench_ids, vocab):
    """The static-shape EAGLE-2 draft (one graph on CUDA) grows the same trees as the eagle2
    policy driving the same head level by level through `expand`, for a ragged batch (with a draft
    vocabulary: mapped to target ids on the device vs on the host)."""
    artifacts = request.getfixturevalue("vocab_artifacts")[0] if vocab else request.getfixturevalue("eagle_artifacts")
    target = load_graph(load_manifest(artifacts), "target", "torch", "cpu")
    drafter = SpeculativeGenerator.from_artifacts(artifacts, "torch", "cpu", drafter="eagle").drafter
    reference = EagleDrafter(drafter.torch_head, drafter.hidden_size, drafter.top_k, drafter.vocab)  # no draft_whole
    cfg = parse_tree_config({"policy": "eagle2", "depth": 4, "top_k": 3, "budget": 12})
    trees = {name: _draft(d, target, bench_ids[0][:3], cfg) for name, d in (("device", drafter), ("policy", reference))}
    for dev, ref in zip(trees["device"], trees["policy"]):
        assert len(dev) == len(ref) == 13
        assert _paths(dev) == _paths(ref)
        np.testing.assert_allclose(sorted(dev.logprobs), sorted(ref.logprobs), atol=1e-4)


def _draft(drafter, target, prompts, cfg) -> list[Tree]:
    """The trees `drafter` grows for `prompts` (root 7) after the target's prefill."""
    out = _prefill(target, prompts)
    drafter.reset([p + [7] for p in prompts], 128)
    for b, p in enumerate(prompts):
        drafter.accept(b, [], Features(out.hidden_states, b, list(range(len(p)))))
    return draft_trees(cfg, drafter, [7] * len(prompts)).trees


def _prefill(target, prompts):
    target.reset(len(prompts), 128)
    return target.step(StepInputs(*batch_tree_inputs([chain_tree(p) for p in prompts], target.lengths)))


def _paths(tree: Tree) -> set[tuple[int, ...]]:
    return {tuple(tree.tokens[n] for n in tree.path_to(i)[1:]) for i in range(1, len(tree))}


# -- sampling: the chi-square harness of tests/test_sampling_distribution.py with a real head ---------

@pytest.fixture(scope="module")
def vocab8(tmp_path_factory):
    """(ONNX Runtime target, the torch EAGLE head) of the random 8-token Llama (tests/support/vocab8.py)."""
    model = vocab8_model()
    backend = vocab8_backend(model, tmp_path_factory.mktemp("vocab8-eagle"))
    torch.manual_seed(4)
    head = make_eagle_head(model).eval()
    yield backend, head
    backend.close()


def _target_logits(backend) -> dict[tuple[int, ...], np.ndarray]:
    backend.reset(1, 64)
    ids, pos, mask = batch_tree_inputs([chain_tree(PROMPT[:-1])], backend.lengths)
    backend.commit(backend.step(StepInputs(ids, pos, mask)), [list(range(len(PROMPT) - 1))])
    tree, prefixes = full_tree(PROMPT[-1], GENERATED)
    logits = backend.step(StepInputs(*batch_tree_inputs([tree], backend.lengths))).logits[0].astype(np.float64)
    return {s: logits[i] for i, s in enumerate(prefixes)}


# Tokens 0, 2 and 5 (a quarter of the first token's probability at T=0.8) are outside: the target's
# draws of them come from the verifier's residual alone. EOS (7) is in.
SAMPLING_VOCAB = [1, 3, 4, 6, 7]


@pytest.mark.parametrize("vocab", [None, SAMPLING_VOCAB], ids=["full", "draft-vocab"])
@pytest.mark.parametrize("tree", [{"policy": "eagle2", "depth": 2, "top_k": 3, "budget": 6},
                                  {"policy": "widths", "widths": [3, 2], "sample_children": True}],
                         ids=["eagle2-topk", "widths-sampled-children"])
def test_eagle_sampling_follows_the_target(vocab8, tree, vocab):
    """Batch of 8 identical prompts x 150 seeds, temperature 0.8: the first 3 tokens' histogram
    matches the target's exact distribution (chi-square p > 0.01), with drafts accepted. With a
    draft vocabulary, the sampled children's q is over target ids and zero outside it."""
    backend, head = vocab8
    if vocab is not None:
        head = copy.deepcopy(head).use_draft_vocab(torch.tensor(vocab))
    exact = exact_distribution(_target_logits(backend), SamplingParams(temperature=0.8))
    drafter = TorchEagleDrafter(TorchEagleHead(head, 1, 16, "cpu"), hidden_size=32, top_k=4)
    gen = TreeGenerator(backend, drafter, eos_token_ids=[], max_context=64)
    cfg, params = parse_tree_config(tree), SamplingParams(temperature=0.8)
    counts: Counter = Counter()
    batch, runs, accepted = 8, 150, []
    for seed in range(runs):
        counts.update(sampled_run(gen, cfg, params, batch, seed))
        accepted += gen.stats.accepted
    assert gen.stats.lossless and max(accepted) >= 2
    assert gen.stats.sampled_children == bool(tree.get("sample_children"))
    assert chi_square_p(counts, exact, batch * runs) > 0.01


def test_eagle_head_runs_int8_weights_on_the_cpu(eagle_artifacts, monkeypatch):
    """On ONNX Runtime's CPU provider the head runs a copy of eagle.onnx with int8 MatMul weights
    (runtime/drafters/int8_graph.py; the lossless tests above run it); TREESPEC_DRAFTER_INT8=0 keeps
    the fp32 graph. The artifact directory is not touched."""
    import onnx

    before = sorted(p.name for p in eagle_artifacts.iterdir())
    gen = SpeculativeGenerator.from_artifacts(eagle_artifacts, "onnxruntime", "cpu", drafter="eagle")
    quantized = gen.drafter.head.session.treespec_int8
    ops = {node.op_type for node in onnx.load(quantized.path, load_external_data=False).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert sorted(p.name for p in eagle_artifacts.iterdir()) == before
    monkeypatch.setenv("TREESPEC_DRAFTER_INT8", "0")
    gen = SpeculativeGenerator.from_artifacts(eagle_artifacts, "onnxruntime", "cpu", drafter="eagle")
    assert gen.drafter.head.session.treespec_int8 is None

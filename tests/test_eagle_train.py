"""The EAGLE head and `train-eagle`: the tree forward is the causal forward, training-time test is
drafting, a tiny training run lowers its loss, the weights round-trip, bench prompts stay out; the
draft vocabulary is the most frequent answer tokens with EOS, saved with the head, and added to an
existing head without training."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from treespec.errors import InputError
from treespec.exporter import eagle_data, eagle_vocab
from treespec.models.checkpoint import load_checkpoint
from treespec.models.drafter_models import MedusaHeads, load_weights, save_weights
from treespec.models.eagle import eagle_from_weights, make_eagle_head
from treespec.runtime.commands import train_eagle

BENCH = Path(__file__).resolve().parent / "data" / "bench.jsonl"

TINY_ARGS = ["--model", "tiny-random", "--prompts", "80", "--seed-questions", "4", "--seed-paragraphs", "2",
             "--corpus-prompts", "0", "--heldout", "6", "--bench-answers", "4", "--target-tokens", "0",
             "--new-tokens", "10", "--generate-batch", "128", "--epochs", "0.6", "--token-batch", "512",
             "--max-length", "64", "--lr", "1e-2", "--warmup", "1", "--unroll", "2", "--compare-unroll", "1"]


@pytest.fixture(scope="module")
def head_and_inputs():
    torch.manual_seed(0)
    target = load_checkpoint("tiny-random").model
    head = make_eagle_head(target).eval()
    with torch.no_grad():  # move away from the identity init so every weight matters
        for p in head.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch, length = 2, 10
    feats = torch.randn(batch, length, target.config.hidden_size)
    ids = torch.randint(0, target.config.vocab_size, (batch, length))
    return target, head, feats, ids


def _empty(head, batch):
    return torch.zeros(batch, head.core.num_kv_heads, 0, head.core.head_dim)


def _step(head, feats, ids, positions, mask, past_len, key, value):
    batch, tokens = ids.shape
    return head(feats, ids, positions.expand(batch, tokens), mask, torch.full((batch,), past_len), key, value)


@torch.no_grad()
def test_tree_forward_with_a_causal_chain_equals_token_by_token_decoding(head_and_inputs):
    _, head, feats, ids = head_and_inputs
    batch, tokens = ids.shape
    causal = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool)).expand(batch, tokens, tokens)
    logits, hidden, key, value = _step(head, feats, ids, torch.arange(tokens), causal, 0, _empty(head, batch),
                                       _empty(head, batch))
    assert logits.dtype == torch.float32 and logits.shape == (batch, tokens, head.lm_head.out_features)
    cache_k = torch.zeros(batch, head.core.num_kv_heads, tokens + 3, head.core.head_dim)  # spare rows: unseen
    cache_v = torch.randn_like(cache_k)
    one = torch.ones(batch, 1, 1, dtype=torch.bool)
    for t in range(tokens):
        lg, h, k, v = _step(head, feats[:, t:t + 1], ids[:, t:t + 1], torch.tensor([[t]]), one, t, cache_k, cache_v)
        cache_k[:, :, t:t + 1], cache_v[:, :, t:t + 1] = k, v
        assert torch.allclose(h[:, 0], hidden[:, t], atol=1e-5)
        assert torch.allclose(lg[:, 0], logits[:, t], atol=1e-5)
    assert torch.allclose(cache_k[:, :, :tokens], key, atol=1e-5)
    assert torch.allclose(cache_v[:, :, :tokens], value, atol=1e-5)


@torch.no_grad()
def test_unrolled_training_steps_equal_drafting_from_the_cache(head_and_inputs):
    """Training-time test step k at row i = drafting k-1 levels with the head's own features after
    the true context up to row i-k+1 is in the cache."""
    _, head, feats, ids = head_and_inputs
    batch, tokens = ids.shape[0], ids.shape[1] - 1
    outs = head.unroll(feats, ids, 4)
    causal = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool)).expand(batch, tokens, tokens)
    _, first, key, value = _step(head, feats[:, :-1], ids[:, 1:], torch.arange(tokens), causal, 0,
                                 _empty(head, batch), _empty(head, batch))
    assert torch.allclose(outs[0], first, atol=1e-5)
    one = torch.ones(batch, 1, 1, dtype=torch.bool)
    for origin in range(tokens - 3):
        cache_k, cache_v, feature = key[:, :, :origin + 1].clone(), value[:, :, :origin + 1].clone(), first[:, origin:origin + 1]
        for k in range(2, 5):
            row = origin + k - 1
            _, feature, nk, nv = _step(head, feature, ids[:, row + 1:row + 2], torch.tensor([[row]]), one,
                                       cache_k.shape[2], cache_k, cache_v)
            assert torch.allclose(feature[:, 0], outs[k - 1][:, row], atol=1e-5), (origin, k)
            cache_k, cache_v = torch.cat([cache_k, nk], dim=2), torch.cat([cache_v, nv], dim=2)


def test_bench_prompts_and_near_copies_are_dropped():
    bench = [json.loads(line)["messages"][-1]["content"] for line in BENCH.read_text().splitlines() if line.strip()]
    near = bench[0].replace(".", "!").upper()
    kept, dropped = eagle_data.bench_filter(["Explain tides to a child.", bench[1], near, "Explain tides to a child."],
                                            bench)
    assert kept == ["Explain tides to a child."] and dropped == 2
    prompts, _ = eagle_data.bench_filter(eagle_data.templated_prompts(3000, __import__("random").Random(1)), bench)
    assert len(prompts) > 2000 and not set(prompts) & set(bench)


def test_extra_data_adds_training_rows_and_never_held_out_prompts():
    T, H, B = eagle_data.SPLIT_TRAIN, eagle_data.SPLIT_HELDOUT, eagle_data.SPLIT_BENCH
    main = eagle_data.pack([[1, 2, 9], [3, 4, 9], [5, 9]], [2, 2, 1], [0, 0, 2], [T, H, B])
    other = eagle_data.pack([[3, 4, 7, 7], [6, 6, 8], [1, 2, 8], [5, 8], [7, 7]], [2, 2, 2, 1, 1],
                            [0, 1, 0, 0, 0], [T, T, T, T, H])
    data, dropped = eagle_data.with_extra(main, [other])
    # [3, 4] is main's held-out prompt and [5] its bench prompt: dropped; [7] is only held out there: not added
    assert dropped == 2
    assert [data.sequence(i).tolist() for i in range(len(data.offsets) - 1)] == [
        [1, 2, 9], [3, 4, 9], [5, 9], [6, 6, 8], [1, 2, 8]]
    assert data.splits.tolist() == [T, H, B, T, T] and data.prompt_lengths.tolist() == [2, 2, 1, 2, 2]
    assert data.kinds.tolist() == [0, 0, 2, 1, 0] and data.ids.dtype == np.uint16


def test_draft_vocab_is_the_most_frequent_answer_tokens_and_eos():
    """Prompt tokens (9, 8) and held-out answers (6) are not counted; ties go to the smaller id; EOS
    (2) is kept though rare, and so is a special id (0) that occurs in an answer; another (1) not."""
    T, H = eagle_data.SPLIT_TRAIN, eagle_data.SPLIT_HELDOUT
    data = eagle_data.pack([[9, 9, 9, 5, 5, 4, 3, 3, 3, 2], [8, 8, 8, 8, 7, 7, 5, 0, 3], [9, 6, 6, 6, 6, 5]],
                           [3, 4, 1], [0, 0, 0], [T, T, H])
    ids, stats = eagle_vocab.build_draft_vocab(data, 4, 16, eos=2, special_ids=[0, 1])
    assert ids.tolist() == [0, 2, 3, 5] and ids.dtype == np.int64  # 3 x4, 5 x3, then 7 x2 is cut for 0 and 2
    assert stats["size"] == 4 and stats["distinct_answer_tokens"] == 6
    assert stats["train_coverage"] == 0.75 and stats["heldout_coverage"] == 0.2  # 9 of 12, 1 of 5
    assert eagle_vocab.most_frequent(np.array([0, 5, 5, 1, 9]), 3).tolist() == [1, 2, 4]
    with pytest.raises(ValueError):
        eagle_vocab.most_frequent(np.array([1, 2]), 3)


def test_data_only_then_extra_data(tmp_path):
    parser = argparse.ArgumentParser()
    train_eagle.add_arguments(parser)
    other = tmp_path / "other.data"
    args = parser.parse_args(TINY_ARGS + ["--out", str(tmp_path / "unused.safetensors"), "--data", str(other),
                                          "--seed", "1", "--data-only"])
    assert train_eagle.run(args) == 0 and (other / "index.npz").is_file()
    assert not (tmp_path / "unused.safetensors").exists()
    _, summary = _tiny_run(tmp_path, ["--extra-data", str(other)])
    own = eagle_data.load(tmp_path / "eagle.data")
    alone = own.lengths()[own.splits == eagle_data.SPLIT_TRAIN].sum()
    assert summary["data"]["train_tokens"] > alone and summary["data"]["extra_data"] == [str(other)]


def _tiny_run(tmp_path, extra=(), name="eagle"):
    parser = argparse.ArgumentParser()
    train_eagle.add_arguments(parser)
    out = tmp_path / f"{name}.safetensors"
    args = parser.parse_args(TINY_ARGS + ["--out", str(out), "--summary", str(tmp_path / "s.json"),
                                          "--data", str(tmp_path / "eagle.data"), *extra])
    assert train_eagle.run(args) == 0
    return out, json.loads((tmp_path / "s.json").read_text())


def test_tiny_train_eagle_lowers_its_loss_and_round_trips(tmp_path):
    out, summary = _tiny_run(tmp_path)
    for head in summary["train"]["heads"]:
        assert head["final_loss"] < 0.98 * head["first_loss"], head  # 5 steps on a random target
    evals = summary["eval"][f"unroll{summary['kept_unroll']}"]
    assert len(evals["heldout"]["top1"]) == 6 and evals["bench"]["sequences"] == 4
    assert evals["heldout"]["tokens_per_step_chain6"] >= 1.0
    data = eagle_data.load(tmp_path / "eagle.data")
    assert data.ids.dtype == np.uint16 and set(np.unique(data.splits)) == {0, 1, 2}

    target = load_checkpoint("tiny-random").model
    head = eagle_from_weights(target, out)
    assert out.stat().st_size < 16e6 and set(head.trainable_state()) == set(
        make_eagle_head(target).trainable_state())
    assert summary["draft_vocab"]["size"] == len(head.draft_vocab) == eagle_vocab.DEFAULT_DRAFT_VOCAB
    assert head.draft_vocab.dtype == torch.int64 and 2 in head.draft_vocab.tolist()  # EOS
    assert head.lm_head.weight.shape == (eagle_vocab.DEFAULT_DRAFT_VOCAB, target.config.hidden_size)
    assert eagle_from_weights(target, out, draft_vocab=False).lm_head is target.lm_head
    with pytest.raises(InputError, match="not an EAGLE head"):
        medusa = tmp_path / "medusa.safetensors"
        save_weights(MedusaHeads(target.config.hidden_size, 2, target.lm_head).trainable_state(), medusa,
                     {"kind": "medusa", "hidden_size": str(target.config.hidden_size)})
        eagle_from_weights(target, medusa)
    with pytest.raises(InputError, match="exists"):
        _tiny_run(tmp_path)
    _, continued = _tiny_run(tmp_path, ["--init", str(out)], name="continued")  # same data, the trained head
    assert continued["train"]["init"] == out.name
    assert continued["train"]["heads"][0]["first_loss"] < summary["train"]["heads"][0]["first_loss"]


def test_vocab_only_adds_a_draft_vocabulary_to_an_existing_head(tmp_path):
    """An old head (no draft_vocab) keeps the full vocabulary; --vocab-only writes the same weights,
    bit for bit, and metadata with a K-id vocabulary of the dataset's answers, without training."""
    out, _ = _tiny_run(tmp_path, ["--draft-vocab", "0"])
    old_state, old_meta = load_weights(out)
    ckpt = load_checkpoint("tiny-random")
    target = ckpt.model
    assert "draft_vocab" not in old_state and eagle_from_weights(target, out).draft_vocab is None
    parser = argparse.ArgumentParser()
    train_eagle.add_arguments(parser)
    new = tmp_path / "vocab.safetensors"
    args = parser.parse_args(["--model", "tiny-random", "--vocab-only", "--init", str(out), "--data",
                              str(tmp_path / "eagle.data"), "--draft-vocab", "64", "--out", str(new)])
    assert train_eagle.run(args) == 0
    state, meta = load_weights(new)
    vocab = state.pop("draft_vocab")
    assert state.keys() == old_state.keys() and all(torch.equal(state[k], old_state[k]) for k in state)
    assert meta["summary"] == old_meta["summary"] and json.loads(meta["draft_vocab_stats"])["size"] == 64
    data = eagle_data.load(tmp_path / "eagle.data")
    counts = np.bincount(eagle_vocab.answer_tokens(data, eagle_data.SPLIT_TRAIN), minlength=target.config.vocab_size)
    kept = {2} | {i for i in ckpt.tokenizer.all_special_ids if counts[i]}
    assert vocab.tolist() == eagle_vocab.most_frequent(counts, 64, kept).tolist() and 2 in vocab.tolist()
    assert eagle_from_weights(target, new).lm_head.out_features == 64


def test_train_eagle_refuses_bad_options(tmp_path):
    parser = argparse.ArgumentParser()
    train_eagle.add_arguments(parser)
    for bad, message in ((["--out", str(tmp_path / "x.bin")], "safetensors"),
                         (["--out", str(tmp_path / "x.safetensors"), "--unroll", "0"], "--unroll"),
                         (["--out", str(tmp_path / "x.safetensors"), "--heldout", "10", "--prompts", "5",
                           "--seed-questions", "0", "--seed-paragraphs", "0", "--corpus-prompts", "0"], "--heldout"),
                         (["--out", str(tmp_path / "x.safetensors"), "--init", str(tmp_path / "none.safetensors")],
                          "--init"),
                         (["--out", str(tmp_path / "x.safetensors"), "--extra-data", str(tmp_path)], "--extra-data"),
                         (["--out", str(tmp_path / "x.safetensors"), "--draft-vocab", "-1"], "--draft-vocab"),
                         (["--out", str(tmp_path / "x.safetensors"), "--vocab-only", "--data", str(tmp_path)],
                          "--vocab-only needs"),
                         (["--out", str(tmp_path / "x.safetensors"), "--vocab-only", "--data", str(tmp_path),
                           "--init", __file__, "--draft-vocab", "8"], "no EAGLE dataset")):
        with pytest.raises(InputError, match=message):
            train_eagle.run(parser.parse_args(bad))

"""Streamed text (runtime/detokenize.py): the deltas, decoded a short window at a time, add up to
decoding the whole sequence, for a byte-level BPE tokenizer (SmolLM2's, with multi-byte characters
split across tokens) and a SentencePiece-style one (Metaspace: a word's leading space is part of its
token and dropped at the start of a decode)."""
from __future__ import annotations

import itertools

import pytest

from treespec.runtime.detokenize import IncrementalText

TEXT = ("Héllo wörld! 你好，世界 🙂🚀 naïve café\n\tdef f(x):\n\t    return x ** 2  # ok\n"
        "Ünïcödé ↔ ∑ αβγ — “quotes” and    spaces.")
CHUNKS = (1, 2, 3, 1, 5, 1, 1, 4)


def _stream(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    text, deltas, sizes, at = IncrementalText(tokenizer), [], itertools.cycle(CHUNKS), 0
    while at < len(ids):
        n = next(sizes)
        deltas.append(text.add(ids[at:at + n], at + n >= len(ids)))
        at += n
    return deltas, tokenizer.decode(ids, skip_special_tokens=True)


def _metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = [TEXT, "the quick brown fox jumps over the lazy dog", "hello world " * 3]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level BPE (SmolLM2)", "Metaspace BPE"])
def test_deltas_add_up_to_the_whole_decode(kind, request):
    if kind.startswith("byte"):
        from treespec.artifacts import load_manifest
        from treespec.runtime.loader import load_tokenizer
        tokenizer = load_tokenizer(load_manifest(request.getfixturevalue("smollm2_artifacts")))
    else:
        tokenizer = _metaspace_tokenizer()
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    ids = ids + [tokenizer.eos_token_id] + ids  # a special token inside: skipped in the text
    deltas, whole = _stream(tokenizer, ids)
    assert "".join(deltas) == whole
    assert not any("\ufffd" in d for d in deltas)  # a split character is held back, never shown half
    assert sum(d == "" for d in deltas) < len(deltas)  # and text flows as it is made

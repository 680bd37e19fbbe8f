"""The EAGLE head's draft vocabulary from its training data: the K most frequent answer tokens.

Why answers only: the head drafts what the target writes, never the prompt (chat template, the
user's text), so the answer tokens of the training split are the frequency that matters. The
tokenizer's EOS is always kept (a draft that cannot propose the end of an answer makes the target
pay a whole step for it), and so is every other special id that occurs in an answer.

Why K = 16,384 by default: a third of SmolLM2's 49,152 rows of lm_head, the GEMM that dominated a
draft level on the CPU (ONNX Runtime, 2 cores, the committed head, tools/cpu_draft_vocab.py: a level
of 8 rows 10.7-13.8 -> 4.4-5.7 ms; an eagle2 d6 k8 n64 draft 89 -> 40 ms). Its cost in acceptance
is the answer tokens outside the subset, measured here per split and written into the head's
metadata (`draft_vocab_stats`), so the choice is checked on every dataset. On a dataset built on
the CPU (795 prompts, 110k answer tokens, 5.6k distinct) the 16,384 ids covered 97.1% of held-out
and 94.7% of bench answer tokens (8,192: 95.0 / 90.1; 32,768: 99.5 / 98.7), and tokens per step
on 12 bench prompts (d6 k8 n64) went 2.81 -> 2.72; the GPU dataset (10.5M tokens) has far more
distinct answer tokens to rank.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from treespec.exporter.eagle_data import SPLIT_BENCH, SPLIT_HELDOUT, SPLIT_TRAIN, TokenData

DEFAULT_DRAFT_VOCAB = 16384


def answer_tokens(data: TokenData, split: int) -> np.ndarray:
    """The answer tokens (after each prompt) of every sequence of `split`, concatenated."""
    lengths = data.lengths()
    seq = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    start = data.offsets[:-1] + data.prompt_lengths
    answer = (np.arange(len(data.ids), dtype=np.int64) >= start[seq]) & (data.splits[seq] == split)
    return data.ids[answer].astype(np.int64)


def most_frequent(counts: np.ndarray, k: int, always: Iterable[int] = ()) -> np.ndarray:
    """The sorted ids of `always` plus the most counted others, k in all. counts: [V] occurrences of
    each id. Ties, the never-seen ids included, go to the smaller id: in a BPE vocabulary the earlier
    merge, a piece more frequent in the tokenizer's own corpus."""
    always = sorted(set(int(i) for i in always))
    if not 1 <= k <= len(counts) or len(always) > k:
        raise ValueError(f"a draft vocabulary of {k} ids must hold 1..{len(counts)} ids and the {len(always)} kept ones")
    order = np.argsort(-counts, kind="stable")
    rest = order[~np.isin(order, always)][:k - len(always)]
    return np.sort(np.concatenate([np.asarray(always, np.int64), rest.astype(np.int64)]))


def build_draft_vocab(data: TokenData, k: int, vocab_size: int, eos: int,
                      special_ids: Iterable[int] = ()) -> tuple[np.ndarray, dict]:
    """(the k ids, stats): the most frequent answer tokens of the training split, EOS and the special
    ids that occur in them always kept; stats: its size and the share of each split's answer tokens
    it covers (1 - coverage bounds the acceptance it can cost)."""
    counts = np.bincount(answer_tokens(data, SPLIT_TRAIN), minlength=vocab_size)[:vocab_size]
    kept = {eos} | {int(i) for i in special_ids if 0 <= int(i) < vocab_size and counts[int(i)] > 0}
    ids = most_frequent(counts, k, kept)
    stats: dict = {"size": int(len(ids)), "distinct_answer_tokens": int((counts > 0).sum())}
    for name, split in (("train", SPLIT_TRAIN), ("heldout", SPLIT_HELDOUT), ("bench", SPLIT_BENCH)):
        tokens = answer_tokens(data, split)
        if len(tokens):
            stats[f"{name}_coverage"] = round(float(np.isin(tokens, ids).mean()), 5)
    return ids, stats

"""EAGLE-3's draft vocabulary: a head that drafts over the K most frequent answer tokens only.

Why: the head applies the target's frozen lm_head at every draft level, and for SmolLM2 that GEMM
(49,152 x 576: 28M MACs a row) outweighs the head's layer (~4.5M) several times over. A draft is
only a proposal that the target verifies, so drafting over a subset is lossless by construction;
it costs acceptance only where the target's token lies outside the subset (exporter/eagle_vocab.py
measures that share on the training data, and gives the CPU timings behind K = 16,384).

A head file may hold `draft_vocab`, int64 [K], sorted distinct target ids. With it the head's
logits are over those K rows of lm_head (gathered once, at load, into a contiguous [K, H] weight:
`subset_lm_head`) and every index a top-k, argmax or draw picks among them is a position in
draft_vocab, mapped back to a target id (`target_ids` on the device, DraftVocab on the host).
Without it: the full vocabulary, as before. The lm_head stays the target's own, so adding a
vocabulary to a trained head needs no retraining: the subset is just rows of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from treespec.errors import InputError

DRAFT_VOCAB = "draft_vocab"  # the tensor's name in a head's safetensors file


def checked_draft_vocab(ids: torch.Tensor, vocab_size: int, path: Path | str) -> torch.Tensor:
    """`ids` as an int64 CPU tensor, refused unless 1-D, non-empty, sorted, distinct and < vocab_size."""
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.is_complex():
        raise InputError(f"{path}: '{DRAFT_VOCAB}' must be a non-empty 1-D integer tensor, got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    ids = ids.to(device="cpu", dtype=torch.int64).contiguous()
    if bool((ids[1:] <= ids[:-1]).any()):
        raise InputError(f"{path}: '{DRAFT_VOCAB}' must hold sorted, distinct token ids")
    if int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
        raise InputError(f"{path}: '{DRAFT_VOCAB}' has ids outside the target's vocabulary of {vocab_size}")
    return ids


def subset_lm_head(lm_head: nn.Linear, draft_vocab: torch.Tensor) -> nn.Linear:
    """A frozen Linear of lm_head's rows `draft_vocab`, copied once into a contiguous [K, H] weight
    on lm_head's device and dtype (so every draft level runs a K-row GEMM, never a gather)."""
    index = draft_vocab.to(lm_head.weight.device)
    weight = lm_head.weight.detach().index_select(0, index).contiguous()
    subset = nn.Linear(weight.shape[1], weight.shape[0], bias=lm_head.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        subset.weight.copy_(weight)
        if lm_head.bias is not None:
            subset.bias.copy_(lm_head.bias.detach().index_select(0, index))
    return subset.requires_grad_(False)


def target_ids(index: torch.Tensor, draft_vocab: torch.Tensor | None) -> torch.Tensor:
    """Positions in the draft vocabulary -> target ids (one gather on index's device; as is
    without a draft vocabulary)."""
    if draft_vocab is None:
        return index
    return draft_vocab.index_select(0, index.reshape(-1)).view(index.shape)


def read_draft_vocab(path: Path, vocab_size: int) -> torch.Tensor | None:
    """The checked draft vocabulary of a head file, or None when it has none (reads only that tensor)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            ids = f.get_tensor(DRAFT_VOCAB) if DRAFT_VOCAB in f.keys() else None
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from None
    return None if ids is None else checked_draft_vocab(ids, vocab_size, path)


@dataclass(frozen=True)
class DraftVocab:
    """A draft vocabulary on the host, for the drafter that ranks subset logits there."""

    ids: np.ndarray  # int64 [K], sorted target ids
    vocab_size: int  # the target's V

    @classmethod
    def of(cls, ids: torch.Tensor | None, vocab_size: int) -> "DraftVocab | None":
        return None if ids is None else cls(ids.cpu().numpy().astype(np.int64), vocab_size)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def target_ids(self, index: np.ndarray) -> np.ndarray:
        return self.ids[index]

    def full_distribution(self, q: np.ndarray) -> np.ndarray:
        """q over the K subset tokens -> [V] over target ids, zero outside the subset (what the
        sampling verifier reads: a child's q[token] and the residual max(p - q, 0))."""
        full = np.zeros(self.vocab_size, dtype=q.dtype)
        full[self.ids] = q
        return full

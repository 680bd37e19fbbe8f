"""Per-slot drafter state for the batch engine (runtime/batching.py): a newcomer's slot starts clean.

The engine keeps one drafter for all of its slots. A slot freed by one request and taken by the
next must not carry the first one's state: the lookup drafter's n-gram index, Medusa's last
feature (replaced by the prefill's accept anyway), EAGLE's context tokens, its pending target
features, its predicted features and its own one-layer KV cache (the slot's rows are dead once
its length is 0: past lengths mask them, as for the target's cache).

EAGLE also keeps the target's features of the last step by reference (Features over the step's
outputs), to feed them to its head when it drafts next. In the engine, an admission's prefill is
one more target step between that accept and the next draft; on CUDA the outputs live in the
captured graph's static buffers, which that prefill overwrites. So before a prefill the pending
features are copied to the host (a few rows per slot).
"""
from __future__ import annotations

from treespec.runtime.drafters.base import Drafter, Features
from treespec.runtime.drafters.eagle import EagleDrafter
from treespec.runtime.drafters.lookup import LookupDrafter, NgramIndex

SLOT_DRAFTERS = ("lookup", "medusa", "eagle")  # drafters whose per-slot state reset_slot replaces


def reset_slot(drafter: Drafter | None, b: int, context: list[int]) -> None:
    """Slot b's drafter state for a new sequence whose tokens so far are `context` (prompt + root);
    the engine then hands it the prefill's features with accept(b, [], ...)."""
    if isinstance(drafter, LookupDrafter):
        index = NgramIndex(drafter.max_ngram)
        index.extend(context)
        drafter.indexes[b] = index
    elif isinstance(drafter, EagleDrafter):
        drafter.tokens[b] = list(context)
        drafter.pending[b] = []
        drafter.predicted[b] = {}
        drafter.head.lengths[b] = 0


def pin_pending(drafter: Drafter | None) -> None:
    """EAGLE's pending target features as host copies (before a target step that is not a draft's)."""
    if not isinstance(drafter, EagleDrafter):
        return
    for b, pending in enumerate(drafter.pending):
        drafter.pending[b] = [Features(f.host()[None], 0, list(range(len(f.rows)))) for f in pending]

"""Optimisation profiles for the tree graphs: from the tree config and context length to the
min/opt/max shape of every engine input.

Three dynamic axes exist (see DESIGN, "Graph I/O"): `batch` (B), `tree_tokens` (T) and `past`
(C, the fixed KV-cache capacity; rows below past_lengths are valid). A graph's manifest entry has
one `profile` {"batch": [min, opt, max], "tree_tokens": [...], "past": [...]} (no "past" for the
Medusa graph), which becomes the engine's profile "tree". When the entry also names
`prefill_tokens` larger than the tree, decoder engines get a second profile "prefill" (T up to
that chunk), so prompts run through kernels tuned for long T while tree steps keep theirs; the
runtime backend holds one execution context per profile.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from treespec.errors import ArtifactError

Range = tuple[int, int, int]
AXES = ("batch", "tree_tokens", "past")
DECODER_GRAPHS = ("target", "draft")

# Which axis each dimension of each contract input is; None marks a static dimension.
_INPUT_AXES: dict[str, tuple[str | None, ...]] = {
    "input_ids": ("batch", "tree_tokens"),
    "position_ids": ("batch", "tree_tokens"),
    "tree_mask": ("batch", "tree_tokens", "tree_tokens"),
    "past_lengths": ("batch",),
    "hidden_states": ("batch", "tree_tokens", None),
}
_CACHE_INPUT = re.compile(r"past_(key|value)_\d+")
_CACHE_AXES: tuple[str | None, ...] = ("batch", None, "past", None)


def tree_profile(tree_tokens: int, max_context: int, max_batch: int = 1, opt_batch: int = 1) -> dict[str, list[int]]:
    """The manifest `profile` for a tree of `tree_tokens` nodes (root included) and a context.

    T runs from 1 (plain decoding, the bonus token) to the tree size, tuned for the full tree.
    The cache capacity is tuned for `max_context` because the runtime allocates the cache once at
    that size and passes the whole buffer every step.
    """
    return {
        "batch": [1, opt_batch, max_batch],
        "tree_tokens": [1, tree_tokens, tree_tokens],
        "past": [1, max_context, max_context],
    }


@dataclass(frozen=True)
class EngineProfile:
    name: str
    batch: Range
    tree_tokens: Range
    past: Range | None  # None for graphs without a KV cache (Medusa)

    def axis(self, name: str) -> Range:
        value: Range | None = getattr(self, name)
        if value is None:
            raise ArtifactError(f"profile '{self.name}' has no '{name}' axis")
        return value

    def contains(self, batch: int, tokens: int, past: int | None = None) -> bool:
        inside = self.batch[0] <= batch <= self.batch[2] and self.tree_tokens[0] <= tokens <= self.tree_tokens[2]
        if past is not None and self.past is not None:
            inside = inside and self.past[0] <= past <= self.past[2]
        return inside

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "batch": list(self.batch), "tree_tokens": list(self.tree_tokens)}
        if self.past is not None:
            out["past"] = list(self.past)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str | None = None) -> "EngineProfile":
        label = name or str(data.get("name", "tree"))
        ranges = {axis: _range(data[axis], axis, label) if axis in data else None for axis in AXES}
        if ranges["batch"] is None or ranges["tree_tokens"] is None:
            raise ArtifactError(f"profile '{label}' needs 'batch' and 'tree_tokens' as [min, opt, max]")
        return cls(label, ranges["batch"], ranges["tree_tokens"], ranges["past"])


def _range(value: Any, axis: str, label: str) -> Range:
    try:
        lo, opt, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ArtifactError(f"profile '{label}': '{axis}' must be [min, opt, max], got {value!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise ArtifactError(f"profile '{label}': '{axis}' needs 1 <= min <= opt <= max, got {[lo, opt, hi]}")
    return lo, opt, hi


def profiles_for_graph(graph: str, entry: Mapping[str, Any]) -> list[EngineProfile]:
    """The engine profiles of one graph from its manifest entry (see the module docstring)."""
    if "profile" not in entry:
        raise ArtifactError(f"graph '{graph}' has no 'profile' in the manifest: nothing to build engines for")
    tree = EngineProfile.from_dict(entry["profile"], "tree")
    if graph in DECODER_GRAPHS and tree.past is None:
        raise ArtifactError(f"graph '{graph}' profile needs a 'past' range (the KV-cache capacity)")
    profiles = [tree]
    prefill = int(entry.get("prefill_tokens") or 0)
    if graph in DECODER_GRAPHS and prefill > tree.tree_tokens[2]:
        profiles.append(EngineProfile("prefill", tree.batch, (1, prefill, prefill), tree.past))
    return profiles


def input_axes(name: str) -> tuple[str | None, ...] | None:
    if name in _INPUT_AXES:
        return _INPUT_AXES[name]
    return _CACHE_AXES if _CACHE_INPUT.fullmatch(name) else None


def input_shapes(name: str, shape: Sequence[int], profile: EngineProfile) -> tuple[list[int], list[int], list[int]]:
    """min/opt/max shapes of input `name` (whose static shape has -1 on dynamic axes)."""
    axes = input_axes(name)
    if axes is None or len(axes) != len(shape):
        raise ArtifactError(
            f"engine input '{name}' {list(shape)} is not part of the tree-graph contract "
            "(input_ids, position_ids, tree_mask, past_lengths, past_key_i/past_value_i, hidden_states)"
        )
    out: tuple[list[int], list[int], list[int]] = ([], [], [])
    for dim, axis in zip(shape, axes):
        if dim >= 0:
            for part in out:
                part.append(dim)
            continue
        if axis is None:
            raise ArtifactError(f"input '{name}' {list(shape)} has a dynamic dimension the contract fixes")
        for i, part in enumerate(out):
            part.append(profile.axis(axis)[i])
    return out

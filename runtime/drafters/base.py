"""The drafter interface: propose candidate children for nodes of a growing token tree.

Tree policies (runtime/trees/policies.py) decide which candidates become nodes; drafters only say what
could come next and how likely they think it is. `expand` is batched over sequences so that a
draft model runs one forward per tree level for the whole batch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from treespec.runtime.trees.config import TreeConfig
from treespec.runtime.trees.tree import Tree


@dataclass
class WholeDraft:
    """Trees a drafter grew by itself: `trees()` brings them to the host (waiting for the device);
    `device` (a device_tensors.DeviceTree, or None) is the same trees where a target on that device
    can verify them without the host (TreeBackend.step_device) while `trees()` runs."""

    trees: Callable[[], list[Tree]]
    device: Any = None


@dataclass
class Candidates:
    """Children proposed for one node, best first."""

    tokens: np.ndarray  # int64 [k]
    logprobs: np.ndarray  # float [k], the drafter's log-probabilities
    distribution: np.ndarray | None = None  # full q over the vocabulary, when the drafter has one

    @classmethod
    def empty(cls) -> "Candidates":
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Features:
    """The target's final hidden states at some rows of one step's output, left where the step put
    them: `hidden` is a host array [B, T, H] or a LazyHost over a device tensor, so a drafter that
    needs only the last row copies only that row, and a device drafter can gather them in place."""

    hidden: Any
    b: int
    rows: list[int]

    def host(self) -> np.ndarray:
        """float32 [len(rows), H]"""
        return np.asarray(self.hidden[self.b, self.rows], dtype=np.float32).reshape(len(self.rows), -1)

    def last(self) -> np.ndarray:
        """float32 [H]: the hidden state at the last row."""
        return np.asarray(self.hidden[self.b, self.rows[-1]], dtype=np.float32).reshape(-1)


class Drafter(ABC):
    kind: str = "abstract"
    max_depth: int | None = None  # Medusa: number of heads; others unbounded
    # Sampling sets this: candidates then carry the drafter's full distribution q (Candidates.distribution)
    return_distributions: bool = False
    # Seconds of the last draft spent on one-off work (a CUDA graph's capture, features fed late after
    # plain steps or an admission): draft_trees leaves them out of the draft time the planners price
    # (the batch engine's load sizer, the `auto` planner).
    one_off_s: float = 0.0

    @abstractmethod
    def reset(self, contexts: list[list[int]], capacity: int) -> None:
        """Start a batch. contexts[b] holds every token so far; its last token is the tree root."""

    @abstractmethod
    def accept(self, b: int, new_tokens: list[int], features: Features) -> None:
        """After a target step: sequence b grew by `new_tokens` (the last one is the next root).
        `features` are the target's hidden states at the positions that step kept: the prompt's at
        the prefill (`new_tokens` empty), the accepted path's nodes (root first, one per new token)
        after a verification; the last is at the node whose prediction is the new root."""

    @abstractmethod
    def expand(self, trees: list[Tree], frontiers: list[list[int]]) -> list[list[Candidates]]:
        """For each sequence b and node n in frontiers[b], candidates for n's children."""

    # Whether reset_slot gives one sequence of a running batch a clean state, so the batch engine
    # (runtime/batching.py) can hand a freed slot to a new request; without it slots decode plainly.
    resets_slots: bool = False

    def reset_slot(self, b: int, context: list[int]) -> None:
        """Sequence b starts anew with `context` (prompt + root) while the others run on; the engine
        then hands it the prefill's features with accept(b, [], ...). Only where resets_slots."""
        raise NotImplementedError(f"the {self.kind} drafter cannot reset one slot of a batch")

    def pin_pending(self) -> None:
        """Before a target step (the batch engine calls it before every one, the generator after each
        draft, which precedes its verify step): copy any features still held by reference
        to the last step's outputs, which that step may overwrite; those a draft consumed are gone
        already, the others wait (a new slot's prefill, a plain step chosen under load or by `auto`).
        Default: none held."""

    def draft_whole(self, cfg: TreeConfig, roots: list[int], active: list[bool]) -> WholeDraft | None:
        """Whole trees for `cfg` grown by the drafter itself (EAGLE-2 in one captured CUDA graph);
        None, the default: the tree policy grows them level by level through `expand`."""
        return None

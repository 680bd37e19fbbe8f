"""The backend interface: one compiled tree graph (target or draft) behind a uniform call.

Modelled on Polygraphy's runners: a backend is loaded from the manifest entry of one graph,
owns its device buffers (the fixed-capacity KV cache included) and runs one tree step at a time.
Every backend (ONNX Runtime CPU/CUDA, TensorRT, TensorRT-RTX, torch) implements this and nothing
else, so the generator never knows which one it drives.

KV cache contract (written into the manifest as `kv_cache`): per layer one key and one value
buffer of shape [B, kv_heads, capacity, head_dim]; rows [0, length[b]) of sequence b are valid.
A step reads the whole buffer (no copy) plus `past_lengths`, returns K/V rows for its T tree
tokens only, and `commit` moves just the accepted rows into the buffer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from treespec.errors import BackendError
from treespec.runtime.backends.device_tensors import topk_logprobs


@dataclass
class StepInputs:
    """One tree step for a batch. Host numpy arrays; backends move them to their device."""

    input_ids: np.ndarray  # int64 [B, T]
    position_ids: np.ndarray  # int64 [B, T]: past length + node depth
    tree_mask: np.ndarray  # bool [B, T, T]: mask[b, i, j] = j is i or an ancestor of i


@dataclass
class StepOutputs:
    """What a step returns. `logits`/`hidden_states` are host arrays (numpy) unless a backend
    documents otherwise; `new_kv` stays on the backend's device until `commit` uses it."""

    logits: np.ndarray  # float32 [B, T, V]
    hidden_states: np.ndarray  # [B, T, H] after the final norm (what Medusa heads read)
    new_kv: Any  # backend-private handle on the new K/V rows of the T tokens
    argmax: np.ndarray | None = None  # optional int64 [B, T] argmax of logits (greedy fast path)


class TreeBackend(ABC):
    """A loaded tree graph plus its KV cache for one batch of sequences."""

    name: str = "abstract"
    min_bucket: int = 1  # every step is padded to at least this many rows, its batch's together (1: no padding)
    _lengths: np.ndarray  # set by reset()
    _capacity: int

    def plan(self, rows: int) -> None:
        """The widest step (batch x tree tokens) of the generation about to start; a backend may
        pick its kernels for the whole generation by it (the torch backend's GEMM kind)."""

    @abstractmethod
    def reset(self, batch_size: int, capacity: int) -> None:
        """(Re)allocate the KV cache for `batch_size` sequences of at most `capacity` tokens and
        set every sequence length to 0."""

    @property
    def lengths(self) -> np.ndarray:
        """int64 [B]: valid cache rows per sequence."""
        return self._lengths

    @property
    def capacity(self) -> int:
        """Rows per sequence the cache may hold (what reset() asked for)."""
        return self._capacity

    @abstractmethod
    def step(self, inputs: StepInputs) -> StepOutputs:
        """Run the graph on T tree tokens per sequence against the current cache."""

    # Whether step_device takes trees a drafter left on this backend's device (device_tensors.DeviceTree)
    device_trees: bool = False

    def step_device(self, tree: Any, overlap: Callable[[], None]) -> StepOutputs:
        """`step` on trees already on the device; `overlap()` is host work to run while it computes."""
        raise NotImplementedError(f"{self.name} takes host trees only")

    @abstractmethod
    def commit(self, outputs: StepOutputs, accepted: Sequence[Sequence[int]]) -> None:
        """Append the K/V rows of tree nodes `accepted[b]` (indices into T, in path order) to
        sequence b's cache. Only these rows move."""

    def checked_rows(self, accepted: Sequence[Sequence[int]], tokens: int) -> Iterator[tuple[int, int, list[int]]]:
        """(b, start, rows) for each sequence with accepted rows, after the checks every commit
        makes: the rows fit in the cache and index the step's `tokens` tree tokens."""
        for b, picked in enumerate(accepted):
            rows = [int(r) for r in picked]
            if not rows:
                continue
            start = int(self._lengths[b])
            if start + len(rows) > self._capacity:
                raise BackendError("KV cache capacity exceeded")
            if any(not 0 <= r < tokens for r in rows):
                raise BackendError(f"accepted row out of range (step had {tokens} tokens)")
            yield b, start, rows

    def topk_logprobs(self, outputs: StepOutputs, rows: Sequence[tuple[int, int]],
                      k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k token ids (int64 [N, k], best first) and log-probs (float64 [N, k]) of the (b, t)
        rows of `outputs.logits`: how drafters rank candidates, where the logits lie (device
        logits are ranked on the device: no [T, V] logits cross to the host)."""
        return topk_logprobs(outputs.logits, rows, k)

    def read_cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Host copy of the valid cache (per layer, key and value): for tests and debugging."""
        raise NotImplementedError(f"{self.name} does not expose its cache")

    def close(self) -> None:
        """Release device memory and sessions."""


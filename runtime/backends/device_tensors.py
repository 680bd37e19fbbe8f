"""Step outputs that stay on the device (torch tensors), shared by the torch backend and the
ONNX Runtime device-buffer backend: the generator and drafters index them like numpy arrays, and
only the indexed elements cross to the host."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket_for(tokens: int, min_rows: int = 1, batch: int = 1) -> int | None:
    """The smallest bucket holding `tokens` whose batch of steps has at least `min_rows` rows in all;
    None past the largest."""
    floor = max(tokens, -(-min_rows // batch))
    for b in BUCKETS:
        if b >= floor:
            return b
    return None


def pad_step(input_ids, position_ids, tree_mask, lengths, tokens: int, out=None):
    """A step's [B, T] inputs padded to `tokens`: padding ids 0 at position `lengths[b]`, each
    padding row seeing only itself. Written into `out` = (ids, pos, mask) when given."""
    batch, t = input_ids.shape
    ids, pos, mask = out if out is not None else (np.empty((batch, tokens), np.int64), np.empty(
        (batch, tokens), np.int64), np.empty((batch, tokens, tokens), np.bool_))
    ids[:, :t] = input_ids
    ids[:, t:] = 0
    pos[:, :t] = position_ids
    pos[:, t:] = lengths[:, None]
    mask[:] = 0
    mask[:, :t, :t] = tree_mask
    pad = np.arange(t, tokens)
    mask[:, pad, pad] = 1
    return ids, pos, mask


@dataclass
class DeviceTree:
    """Token trees already on the device, as a drafter drafted them (the captured EAGLE-2 draft): the
    target verifies them without the host building and uploading them (TorchBackend.step_device).
    ids [B, n] int64 (node 0 the root), depths [B, n] int64, mask [B, n, n] bool (ancestors and self)."""

    ids: Any
    depths: Any
    mask: Any


def pad_device_step(tree: DeviceTree, lengths, tokens: int, ids, pos, mask) -> None:
    """pad_step on the device: `tree` padded to `tokens` into the step's ids/pos [B, tokens] and mask
    [B, tokens, tokens] (int64 views of a static input); `lengths` [B] the cached lengths, on the device."""
    n = tree.ids.shape[1]
    ids[:, :n].copy_(tree.ids)
    ids[:, n:].zero_()
    pos.copy_(lengths[:, None].expand_as(pos))
    pos[:, :n] += tree.depths
    mask.zero_()
    mask.diagonal(dim1=1, dim2=2).fill_(1)  # padding rows see only themselves
    mask[:, :n, :n].copy_(tree.mask)


class LazyHost:
    """A device tensor [B, Tpad, ...] that looks enough like a numpy array [B, T, ...]:
    indexing copies only the selected elements to the host."""

    def __init__(self, tensor, rows: int):
        self.tensor = tensor
        self.rows = rows  # real tokens (T before padding)

    @property
    def shape(self):
        return (self.tensor.shape[0], self.rows, *self.tensor.shape[2:])

    def __getitem__(self, key):
        return _host(self.tensor[:, : self.rows][key])

    def __array__(self, dtype=None, copy=None):
        arr = _host(self.tensor[:, : self.rows])
        return arr.astype(dtype) if dtype is not None else arr


def _host(tensor) -> np.ndarray:
    """A host array that owns its memory: the backends overwrite their output buffers next step."""
    tensor = tensor.float()
    return tensor.numpy().copy() if tensor.device.type == "cpu" else tensor.cpu().numpy()


def topk_logprobs(logits, rows: Sequence[tuple[int, int]], k: int):
    """Top-k token ids and log-probs of the (b, t) rows of [B, T, V] logits (a LazyHost or host
    array), ranked where the logits lie: (ids int64 [N, k], best first; logprobs float64 [N, k])."""
    if not isinstance(logits, LazyHost):
        return _host_topk_logprobs(np.asarray(logits), rows, k)
    import torch

    tensor = logits.tensor
    index = torch.as_tensor(np.asarray(rows, dtype=np.int64).reshape(-1, 2), device=tensor.device)
    lp, ids = torch.topk(torch.log_softmax(tensor[index[:, 0], index[:, 1]].float(), -1), k, dim=-1)
    packed = torch.cat([ids.double(), lp.double()], dim=-1).cpu().numpy()  # one transfer; ids exact
    return packed[:, :k].astype(np.int64), packed[:, k:]


def _host_topk_logprobs(logits: np.ndarray, rows: Sequence[tuple[int, int]], k: int):
    """The same on the host, in numpy. Why not torch there: right after an ONNX Runtime run its
    intra-op threads still spin, and torch's thread pool then waits for cores: 2-4 ms for the
    top-k of one 49k-token row on 2 cores, against 0.4 ms in numpy (measured)."""
    index = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    z = logits[index[:, 0], index[:, 1]].astype(np.float64)  # [N, V]
    k = min(k, z.shape[-1])
    top = np.argpartition(-z, k - 1, axis=-1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(z, top, -1), axis=-1, kind="stable"), -1)
    peak = z.max(-1, keepdims=True)
    logsumexp = peak + np.log(np.exp(z - peak).sum(-1, keepdims=True))
    return top.astype(np.int64), np.take_along_axis(z, top, -1) - logsumexp

"""The EAGLE drafter on PyTorch (torch backend): EAGLE-2 trees drafted whole on the device.

Why: on the H200 a verify step of the target costs ~1 ms and a replayed kernel a few microseconds,
while the same draft run level by level from the host costs a sync and a host round trip per level
(the draft LM spent 4.2 ms per step that way). So for the `eagle2` policy the whole draft is ONE
captured CUDA graph with static shapes (batch, depth D, top-k K, budget N):
  1. feed the pending (target feature, next token) rows, at most D + 1 per sequence, and commit
     them to the head's cache (rows past a sequence's count land beyond its length: never seen);
  2. level 1: the top-K children of the root from the last fed row;
  3. levels 2..D: run the head on the K nodes expanded at the previous level (the fused head: on
     those K rows, attending to their ancestors' K/V rows written past the length; the unfused
     head: on every expanded node so far, tree-masked), take the top-K children of each, keep the
     K best by cumulative log-probability as the next expanded nodes (EAGLE-2's topK_genrate);
  4. rerank all K + (D-1)K^2 drafted candidates with a STABLE sort, so on equal scores a parent
     (drafted earlier) comes first and the best N are ancestor-closed; order them parents first.
  5. the kept trees as the target verifies them (ids, depths, ancestor masks: eagle2_kernels.tree_of),
     left on the device: a torch target verifies them there (TorchBackend.step_device) while the host
     builds its own copy from the packed tree (tokens, parents, log-probs: [B, 3N] float32, copied to
     pinned memory behind an event), which is all that crosses to the host.
Other policies grow trees through `expand`, unfused.

The fused head (treespec.models.fused_eagle, ~14 kernels a forward instead of ~50, with the
tree-KV levels and the Triton bookkeeping of eagle2_kernels) is the default on CUDA
(TREESPEC_EAGLE_FUSED=0 for the unfused one). On the H200 with the trained head (2026-12-03): a d6-k8-n64
draft in 109 kernels, 0.91 ms median (unfused 676 kernels, 2.1 ms), captured equal to eager, its trees
equal to the unfused head's, lossless on the bench prompts. An earlier version replayed its captured
graph on a freed RoPE table (reset() rebuilt the table at every prompt: torch.device("cuda") != the
table's "cuda:0"); the table is now grown in one place (fused_decoder.grown_rope_table) and a change of
table recaptures the graph.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
import torch

from treespec.errors import BackendError
from treespec.models.draft_vocab import DraftVocab
from treespec.models.eagle import EagleHead
from treespec.runtime.backends.base import StepInputs, StepOutputs, TreeBackend
from treespec.runtime.backends.device_tensors import DeviceTree, LazyHost
from treespec.runtime.backends.torch_backend import requested_gemm
from treespec.runtime.drafters.base import Features, WholeDraft
from treespec.runtime.drafters.eagle import EAGLE_TOP_K, EagleDrafter, EagleStepInputs, PinnedFeatures
from treespec.runtime.drafters.eagle_tree import Eagle2Buffers, Eagle2Shape, eagle2_draft
from treespec.runtime.trees.config import TreeConfig
from treespec.runtime.trees.tree import Tree

SPARE_ROWS = 128  # head cache rows past the capacity: where the padded pending rows land
FUSED_HEAD_ENV = "TREESPEC_EAGLE_FUSED"  # "0": the unfused head on CUDA (module doc)


class TorchEagleHead(TreeBackend):
    """The head module with its one-layer cache [B, KVH, rows, D] on the target's device."""

    name = "torch-eagle"

    def __init__(self, module: torch.nn.Module, num_kv_heads: int, head_dim: int, device: str,
                 fused: bool | None = None):
        self.module = module
        self.kv_tail = (num_kv_heads, head_dim)
        self.device = torch.device(device)
        self.dtype = next(module.parameters()).dtype
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.generation = 0  # bumped when the cache is reallocated: captured graphs are stale
        self._lengths = np.zeros(0, np.int64)
        self._capacity = 0
        # the few-kernel forward of the eagle2 draft (None: the unfused head, the CPU default)
        self.fused = _fused_head(module, fused, self.device.type == "cuda")
        # A draft vocabulary: the eagle2 draft maps positions to target ids on the device, `expand`'s
        # candidates on the host (treespec.models.draft_vocab).
        vocab = module.draft_vocab if isinstance(module, EagleHead) else None
        self.draft_vocab = None if vocab is None else vocab.to(self.device)
        self.host_vocab = None if vocab is None else DraftVocab.of(vocab, module.vocab_size)

    def reset(self, batch_size: int, capacity: int) -> None:
        rows = -(-(capacity + SPARE_ROWS) // 256) * 256
        if self.key is None or self.key.shape[0] != batch_size or self.key.shape[2] < rows:
            shape = (batch_size, *self.kv_tail[:1], rows, self.kv_tail[1])
            self.key = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.value = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.generation += 1
        if self.fused is not None:
            # A captured draft reads the RoPE table by address: a new table makes its graphs stale.
            # The cache's own device, not self.device: torch.device("cuda") != the tables'
            # "cuda:0", and that mismatch rebuilt (and freed) the table at every reset, so replays
            # after the next prompt's reset read freed memory (the H200's index-out-of-range assert).
            table = self.fused.cos
            self.fused.rope_table(self.key.shape[2], self.key.device)
            if self.fused.cos is not table:
                self.generation += 1
        self._lengths = np.zeros(batch_size, np.int64)
        self._capacity = capacity

    def forward(self, hidden, ids, pos, mask, lengths, first_logits_row: int = 0):
        """The head on device tensors against the whole cache (rows < lengths[b] visible); logits
        only for rows >= first_logits_row (an EagleHead skips the lm_head on the others)."""
        head = self.module
        if isinstance(head, EagleHead):
            predicted, (key, value) = head.core.decode_layers(head.fuse(hidden, ids), pos, mask, lengths,
                                                              (self.key, self.value))
            return head.logits(predicted[:, first_logits_row:]), predicted, key, value
        logits, predicted, key, value = head(hidden, ids, pos, mask, lengths, self.key, self.value)
        return logits[:, first_logits_row:], predicted, key, value

    def step(self, inputs: StepInputs) -> StepOutputs:
        if self.key is None or not isinstance(inputs, EagleStepInputs):
            raise BackendError("the EAGLE head needs reset() and then EagleStepInputs")
        dev = self.device
        with torch.inference_mode():
            logits, hidden, key, value = self.forward(
                torch.as_tensor(inputs.hidden_states, device=dev).to(self.dtype),
                torch.as_tensor(inputs.input_ids, device=dev), torch.as_tensor(inputs.position_ids, device=dev),
                torch.as_tensor(inputs.tree_mask, device=dev), torch.as_tensor(self._lengths, device=dev))
        t = inputs.input_ids.shape[1]
        return StepOutputs(logits=LazyHost(logits, t), hidden_states=LazyHost(hidden, t),
                           new_kv=(self._lengths.copy(), key, value))

    def advance(self, counts: np.ndarray) -> None:
        """Lengths after a captured draft committed `counts[b]` rows in place (past each length)."""
        self._lengths += counts

    def commit(self, outputs: StepOutputs, accepted) -> None:
        base, key, value = outputs.new_kv
        if not np.array_equal(base, self._lengths):
            raise BackendError("commit() must follow the step whose rows it commits")
        for b, start, rows in self.checked_rows(accepted, key.shape[2]):
            idx = torch.as_tensor(rows, device=self.device)
            self.key[b, :, start:start + len(rows)] = key[b][:, idx]
            self.value[b, :, start:start + len(rows)] = value[b][:, idx]
            self._lengths[b] = start + len(rows)


class TorchEagleDrafter(EagleDrafter):
    """EagleDrafter over TorchEagleHead; `eagle2` trees drafted whole (one CUDA graph on CUDA)."""

    def __init__(self, head: TorchEagleHead, hidden_size: int, top_k: int = EAGLE_TOP_K,
                 use_graphs: bool | None = None):
        super().__init__(head, hidden_size, top_k, head.host_vocab)
        self.torch_head = head
        self.use_graphs = head.device.type == "cuda" if use_graphs is None else use_graphs
        self._buffers: dict[Eagle2Shape, Eagle2Buffers] = {}

    def draft_whole(self, cfg: TreeConfig, roots: list[int], active: list[bool]) -> WholeDraft | None:
        if cfg.policy != "eagle2" or self.return_distributions:
            return None
        shape = Eagle2Shape(len(roots), min(cfg.levels, cfg.depth), cfg.top_k, cfg.budget)
        self._catch_up(keep=shape.chain)
        buf = self._buffers.get(shape)
        if buf is None:
            buf = self._buffers[shape] = Eagle2Buffers(shape, self.hidden_size, self.torch_head.dtype,
                                                       self.torch_head.device)
        with torch.inference_mode():
            count = self._load(buf, roots)
            packed, device = self._run(buf)
            # to the host without waiting for what is queued after the draft (the target's step)
            buf.packed_host.copy_(packed, non_blocking=True)
            if buf.ready is not None:
                buf.ready.record()
        self.torch_head.advance(count)

        def trees() -> list[Tree]:
            if buf.ready is not None:
                buf.ready.synchronize()
            return _trees(buf.packed_host.numpy(), shape.kept, roots, active)
        return WholeDraft(trees, device)

    # -- host side of a step: pending rows in, the graph run ---------------------------------------
    def _row_reader(self, pending: list[list[Features]]) -> Callable[[Features], np.ndarray]:
        """Rows pinned on the device (pin_pending: one small tensor per plain step under load) cross
        in one copy for every sequence and step, not one per step and sequence (a catch-up after 100
        plain steps at 64 streams would be 6,400 copies)."""
        pinned = {id(f.hidden): f.hidden.tensor[0] for p in pending for f in p
                  if isinstance(f.hidden, PinnedFeatures)}
        if not pinned:
            return Features.host
        host = torch.cat(list(pinned.values())).float().cpu().numpy()
        start = dict(zip(pinned, np.cumsum([0] + [t.shape[0] for t in pinned.values()])))

        def read(f: Features) -> np.ndarray:
            if isinstance(f.hidden, PinnedFeatures):
                return host[start[id(f.hidden)] + np.asarray(f.rows, dtype=np.int64)]
            return f.host()
        return read

    def _load(self, buf: Eagle2Buffers, roots: list[int]) -> np.ndarray:
        """Pending tokens, lengths, counts, feature rows and roots into the static inputs (one upload),
        then the pending features gathered on the device. Returns the counts."""
        ids, lengths, count, gather, root_ids = buf.host_views()
        ids[:] = 0
        gather[:] = 0
        lengths[:] = self.head.lengths
        root_ids[:] = roots
        sources = []
        for b, pending in enumerate(self.pending):
            feats = pending[0] if pending else None
            n = len(feats.rows) if feats is not None else 0
            count[b] = n
            ids[b, :n] = self.tokens[b][lengths[b] + 1:lengths[b] + 1 + n]
            if feats is not None and isinstance(feats.hidden, LazyHost):  # row of the output [B_out * T, H]
                gather[b, :n] = feats.b * feats.hidden.tensor.shape[1] + np.asarray(feats.rows)
            sources.append(feats)
            self.pending[b] = []
        counts = count.copy()
        buf.ints.copy_(buf.host, non_blocking=True)
        self._gather(buf, sources)
        return counts

    def _gather(self, buf: Eagle2Buffers, sources: list[Features | None]) -> None:
        """The pending target features into buf.feats: one index_select when every sequence's rows
        lie in the same step output (the usual case), else per sequence through the host."""
        present = [f for f in sources if f is not None]
        if present and all(f.hidden is present[0].hidden for f in present) and isinstance(present[0].hidden, LazyHost):
            out = present[0].hidden.tensor
            rows = out.reshape(-1, out.shape[-1])
            feats = buf.feats.view(-1, buf.feats.shape[-1])
            if rows.dtype == feats.dtype:
                torch.index_select(rows, 0, buf.gather, out=feats)
            else:
                feats.copy_(rows.index_select(0, buf.gather))
            return
        host = np.zeros(buf.feats.shape, np.float32)
        for b, feats in enumerate(sources):
            if feats is not None:
                host[b, :len(feats.rows)] = feats.host()
        buf.feats.copy_(torch.as_tensor(host))

    def _run(self, buf: Eagle2Buffers) -> tuple[torch.Tensor, DeviceTree]:
        """The draft: replayed from its CUDA graph (captured on first use: one-off work), or eagerly."""
        if not self.use_graphs:
            return eagle2_draft(self.torch_head, buf)
        if buf.graph is None or buf.generation != self.torch_head.generation:
            t0 = time.perf_counter()
            _capture(self.torch_head, buf)
            self.one_off_s += time.perf_counter() - t0
        buf.graph.replay()
        return buf.outputs


def _trees(packed: np.ndarray, n: int, roots: list[int], active: list[bool]) -> list[Tree]:
    """Host trees from the packed draft [B, 3N] (tokens, parents, log-probs); inactive ones root only."""
    trees = []
    for b, root in enumerate(roots):
        if not active[b]:
            trees.append(Tree.root_only(root))
            continue
        row = packed[b]
        trees.append(Tree(tokens=[root] + row[:n].astype(np.int64).tolist(),
                          parents=[-1] + row[n:2 * n].astype(np.int64).tolist(),
                          logprobs=[0.0] + row[2 * n:].astype(np.float64).tolist()))
    return trees


def _capture(head: TorchEagleHead, buf: Eagle2Buffers) -> None:
    """Warm up on a side stream, then capture the draft (its writes land past each sequence's
    length, so neither the warm-up nor the capture changes what the cache holds)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            eagle2_draft(head, buf)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        buf.outputs = eagle2_draft(head, buf)
    buf.graph, buf.generation = graph, head.generation


def _fused_head(module: torch.nn.Module, fused: bool | None, cuda: bool):
    """The head's few-kernel forward (treespec.models.fused_eagle) when asked for (`fused` True, or
    on CUDA unless TREESPEC_EAGLE_FUSED=0), unless the head dim is one the ordered
    attention does not take. On the CPU it needs Triton's interpreter (tests)."""
    asked = fused
    if fused is None:
        fused = cuda and os.environ.get(FUSED_HEAD_ENV, "1") != "0"
    if not fused or not isinstance(module, EagleHead):
        return None
    dim = module.core.head_dim
    if asked is None and (dim & (dim - 1) or dim < 16):
        return None
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError("the fused EAGLE head runs on CUDA (on the CPU only under TRITON_INTERPRET=1)")
    from treespec.models.fused_decoder import GEMMS  # Triton: an optional heavy dependency
    from treespec.models.fused_eagle import FusedEagleHead

    gemm = requested_gemm()  # the target's GEMM kind: cublas, triton, or auto (by rows)
    return FusedEagleHead(module, gemm if gemm in GEMMS else "auto")

"""PyTorch backend: the tree graph run by PyTorch itself (fp16 + CUDA graphs on the GPU, fp32 on CPU).

The model is our TreeDecoder (treespec_pkg/models/tree_model.py) over the HF model that
runtime/loader.py loads from the artifacts' own `torch_weights`, so it has exactly the graph contract; only the KV handling differs from the ONNX graphs, for speed:

* One static buffer [2*layers, B, KVH, capacity + SCRATCH, D] is allocated in `reset`. A step
  writes the K/V rows of its T tree tokens into the scratch rows [length, length + T) of each
  sequence (not yet valid) and attends over the whole buffer with a mask: rows < length are the
  past, scratch row length + j is visible to token i iff tree_mask[i, j]. `commit` then moves only
  the accepted rows down to [length, length + n) with one index_select/index_copy on the device
  (nothing moves when the accepted path is already contiguous: plain decoding, the prefill).
* T is padded up to a bucket (1, 2, 4, ..., 128) with self-only mask rows; on CUDA each
  (batch, bucket) step is captured once in a CUDA graph (capacity is fixed per reset, so the
  graphs stay valid until the next reset changes the shape). Steps over 128 tokens run eagerly.
* `min_bucket`: every step of the target is padded to at least this many rows (64 on CUDA; 1 with
  the fused step's Triton GEMMs, whose every kernel, lm_head included, computes a row the same bits
  whatever the step's width or batch, so a 1-token step and a tree step agree), counting
  every sequence of the batch (a batch of 8 pads each to 8 tokens: padding each sequence to 64 made a
  plain step of 64 served requests verify 4,096 rows, and the load sizer then saw no gain in plain
  decoding). fp16
  GEMMs pick different kernels (split-K, tile shapes) for different row counts, and a one-row
  decode step rounds differently from the same row inside a 64-row tree step, which can flip an
  argmax at a near tie. Running plain decoding and tree verification through the same bucket (the
  same kernels) removes that source of divergence; at 135M parameters a 64-token step costs the
  same as a 1-token step (launch-bound, see `treespec bench`'s verify curve), so the baseline is
  not slowed.
* Attention on CUDA is the plugin's position-ordered Triton kernel
  (plugins/tree_attention/ordered.py): a token's keys are reduced in the order of their absolute
  positions, so a token verified inside a tree gets bitwise the output it gets when decoded
  alone. SDPA over the buffer (CPU, or TREESPEC_TORCH_ATTENTION=sdpa) reduces over buffer
  columns, where a tree puts ancestors elsewhere than plain decoding does: near-tie argmaxes
  then flip in fp16 (measured on the H100: 1-3 of 10 bench prompts diverged).
* On CUDA the step is fused by default (treespec.models.fused_decoder; TREESPEC_TORCH_FUSED=0 for
  the unfused step, =cublas or =triton for one kind of GEMM at every width): 9 kernels per layer with
  cuBLAS GEMMs (concatenated QKV and gate/up GEMMs, Triton add+RMSNorm, RoPE + cache write, SiLU*mul,
  the ordered attention) instead of ~40, 5 with Triton GEMMs, with the same buckets, graphs and cache
  contract. The default, auto, chooses the GEMM kind per generation (`plan`, called by the generator
  and the batch engine with the generation's widest step): Triton GEMMs and no padding up to
  ROW_EXACT_ROWS rows (plain decoding; trees of <= 31 nodes at batch 1), else cuBLAS with every step
  padded to 64 rows. A generation's plain and tree steps share its kind, so it is lossless against
  plain decoding of that kind (the bench and the GPU tests hold each run to the plain reference of its
  kind: `pinned_kind`). H200, SmolLM2 fp16, cuBLAS GEMMs: 274 kernels and 1.19 ms a step against 1,237
  and 3.95 ms unfused; plain decoding 1011 tok/s against 342; tree nodes bitwise equal to plain
  decoding (88/88).
* Outputs stay on the device: `logits`/`hidden_states` are lazy host views that copy only the rows
  indexed; `argmax` (the greedy path) is computed in the graph and copied as [B, T] int64.
  `topk_logprobs` gives drafters their candidates without moving [T, V] logits to the host.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from treespec.errors import BackendError

from treespec.models.tree_model import TreeDecoder
from treespec.runtime.backends.base import StepInputs, StepOutputs, TreeBackend
from treespec.runtime.backends.device_tensors import BUCKETS, DeviceTree, LazyHost, bucket_for, pad_device_step, pad_step

SCRATCH = BUCKETS[-1]


class _Graph:
    """Static buffers and (on CUDA) the captured graph of one (batch, bucket) step."""

    def __init__(self, batch: int, tokens: int, device):
        import torch

        self.batch, self.tokens = batch, tokens
        n = batch * (2 * tokens + 1 + tokens * tokens)
        self.host = torch.zeros(n, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.dev = torch.zeros(n, dtype=torch.int64, device=device)
        self.graph = None
        self.outputs = None


def _unpack(packed, batch: int, tokens: int):
    """(ids [B,T], pos [B,T], lengths [B], mask [B,T,T]): views of a step's packed int64 input (a host
    array or a device tensor), laid out [ids, pos, lengths, mask]."""
    n = batch * tokens
    return (packed[:n].reshape(batch, tokens), packed[n:2 * n].reshape(batch, tokens), packed[2 * n:2 * n + batch],
            packed[2 * n + batch:].reshape(batch, tokens, tokens))


# "auto": the widest step (batch x tree tokens) a generation may have for Triton GEMMs. Up to 32 rows the
# Triton step beats the cuBLAS one at every width (H100, K-loop lm_head: 825 us at 32 rows, cuBLAS 950-1008
# at 8-64); past 32 its 16-row programs run in several waves (1170 us at 64). bench/h100-2026-12-07-2200/width_curve.json
ROW_EXACT_ROWS = 32


class TorchBackend(TreeBackend):
    name = "torch"
    device_trees = True

    def __init__(self, model, device: str = "cpu", use_graphs: bool | None = None, min_bucket: int | None = None,
                 host_argmax: bool = True, fused: bool | str | None = None):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.decoder = model if isinstance(model, TreeDecoder) else TreeDecoder(model)
        self.dtype = self.decoder.lm_head.weight.dtype
        self.use_graphs = self.cuda if use_graphs is None else (use_graphs and self.cuda)
        self.host_argmax = host_argmax  # the draft LM ranks with topk_logprobs: no argmax copy
        self._kernel = _ordered_attention(self.decoder.head_dim) if self.cuda else None
        self.ordered = self._kernel is not None
        self.fused = _fused_decoder(self.decoder, fused, self.cuda)  # None: the unfused step below
        # "auto": plan() picks the GEMM kind per generation (module doc), cuBLAS-padded until then
        self.gemm_choice = self.fused.gemm if self.fused is not None else None
        self.min_bucket_fixed = min_bucket is not None
        self.pinned_kind: str | None = None  # the kind plan() keeps to ("triton" or "auto": the bench's references)
        padded = self.cuda and self.gemm_choice != "triton"  # Triton GEMMs need no padding (module doc)
        self.min_bucket = min_bucket if self.min_bucket_fixed else (64 if padded else 1)
        dec = self.decoder
        self.num_layers = dec.num_layers
        self.groups = dec.num_heads // dec.num_kv_heads
        self._cache = None
        self._capacity = 0
        self._lengths = np.zeros(0, dtype=np.int64)
        self._graphs: dict[tuple[int, int, str], _Graph] = {}
        self.graph_pool = None
        self.steps = 0

    # ---- GEMM kind ---------------------------------------------------------------------------
    @property
    def gemm_kind(self) -> str:
        """The fused step's GEMMs now: "triton" (row-exact, unpadded), "auto" or "cublas" (cuBLAS for
        steps padded to 64 rows), or "unfused"."""
        return self.fused.gemm if self.fused is not None else "unfused"

    def plan(self, rows: int) -> None:
        """The widest step (batch x tree tokens) of the generation about to start. With the "auto"
        GEMM choice this picks the kind for the whole generation (module doc): Triton GEMMs at up to
        ROW_EXACT_ROWS rows (every step at its own bucket), else cuBLAS with steps padded to 64 rows."""
        if self.gemm_choice != "auto" or self.min_bucket_fixed:
            return
        kind = self.pinned_kind or ("triton" if rows <= ROW_EXACT_ROWS else "auto")
        self.fused.gemm, self.min_bucket = kind, 64 if kind == "auto" and self.cuda else 1

    # ---- cache -------------------------------------------------------------------------------
    def reset(self, batch_size: int, capacity: int) -> None:
        torch = self.torch
        dec = self.decoder
        # Rows rounded up to 256 (memory-efficient SDPA also wants aligned masks) and a buffer that
        # is large enough is kept: captured graphs survive resets between prompts.
        rows = -(-(capacity + SCRATCH) // 256) * 256
        shape = (2 * self.num_layers, batch_size, dec.num_kv_heads, rows, dec.head_dim)
        current = None if self._cache is None else tuple(self._cache.shape)
        if current is None or current[:3] != shape[:3] or current[3] < rows:
            self._graphs.clear()  # captured graphs point at the old buffer
            # A memory pool whose graphs were all destroyed must not be captured into again
            # (CUDACachingAllocator asserts use_count > 0): start a fresh pool with the new graphs.
            self.graph_pool = None
            self._cache = None
            self._cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self._cols = torch.arange(rows, device=self.device)
        self._capacity = capacity
        self._lengths = np.zeros(batch_size, dtype=np.int64)

    def read_cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        n = int(self._lengths.max()) if len(self._lengths) else 0
        for i in range(self.num_layers):
            k = self._cache[2 * i, :, :, :n].float().cpu().numpy()
            v = self._cache[2 * i + 1, :, :, :n].float().cpu().numpy()
            out.append((k, v))
        return out

    def close(self) -> None:
        self._graphs.clear()
        self.graph_pool = None
        self._cache = None

    # ---- the step ----------------------------------------------------------------------------
    def _forward(self, packed, batch: int, tokens: int):
        """The whole step from the packed int64 input [ids, pos, lengths, mask] (static shapes)."""
        torch = self.torch
        dec = self.decoder
        ids, pos, lengths, mask = _unpack(packed, batch, tokens)
        if self.fused is not None:
            out = self.fused(ids, pos, mask, lengths, self._cache)
            return out.logits, out.hidden, out.argmax
        tree_mask = mask != 0
        cache = self._cache
        if self.ordered:
            ancestors, depths = self._kernel.tree_ancestors(tree_mask)
        else:
            mask = self._buffer_mask(tree_mask, lengths, batch, tokens)
        write = (lengths[:, None] + torch.arange(tokens, device=packed.device)[None, :])
        write = write[:, None, :, None].expand(batch, dec.num_kv_heads, tokens, dec.head_dim)

        hidden = dec.embed(ids)
        cos, sin = dec.rotary(hidden, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        heads, kvh, dim = dec.num_heads, dec.num_kv_heads, dec.head_dim
        for i, layer in enumerate(dec.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            q = attn.q_proj(x).view(batch, tokens, heads, dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, tokens, kvh, dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, tokens, kvh, dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = cache[2 * i], cache[2 * i + 1]
            kc.scatter_(2, write, k.to(kc.dtype))
            vc.scatter_(2, write, v.to(vc.dtype))
            if self.ordered:
                out = self._kernel.ordered_tree_attention(q, kc, vc, lengths, ancestors, depths, dec.scale)
                out = out.view(batch, tokens, heads * dim)
            else:
                qg = q.reshape(batch, kvh, self.groups * tokens, dim)  # GQA: fold groups into rows
                out = torch.nn.functional.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask, scale=dec.scale)
                out = out.view(batch, heads, tokens, dim).transpose(1, 2).reshape(batch, tokens, heads * dim)
            hidden = residual + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = dec.norm(hidden)
        logits = dec.lm_head(hidden).float()
        return logits, hidden, logits.argmax(-1)

    def _buffer_mask(self, tree_mask, lengths, batch: int, tokens: int):
        """[B, 1, G*T, rows] visibility over the whole KV buffer, for SDPA."""
        rows = self._cache.shape[3]
        rel = self._cols[None, :] - lengths[:, None]  # [B, C]
        in_tree = (rel >= 0) & (rel < tokens)
        gathered = self.torch.gather(tree_mask, 2, rel.clamp(0, tokens - 1)[:, None, :].expand(batch, tokens, rows))
        mask = (rel < 0)[:, None, :] | (gathered & in_tree[:, None, :])  # [B, T, C]
        return mask[:, None, None].expand(batch, 1, self.groups, tokens, rows).reshape(
            batch, 1, self.groups * tokens, rows)

    def _pack(self, g: _Graph, inputs: StepInputs, tokens: int) -> None:
        ids, pos, lengths, mask = _unpack(g.host.numpy(), inputs.input_ids.shape[0], tokens)
        pad_step(inputs.input_ids, inputs.position_ids, inputs.tree_mask, self._lengths, tokens, (ids, pos, mask))
        lengths[:] = self._lengths
        g.dev.copy_(g.host, non_blocking=True)

    def _graph_for(self, batch: int, tokens: int) -> _Graph:
        key = (batch, tokens, self.gemm_kind)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = _Graph(batch, tokens, self.device)
        return g

    def _capture(self, g: _Graph) -> None:
        torch = self.torch
        saved = self._cache.clone()  # warm-up and capture write scratch rows: keep the cache as it is
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._forward(g.dev, g.batch, g.tokens)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.graph_pool):
            g.outputs = self._forward(g.dev, g.batch, g.tokens)
        g.graph = graph
        self._cache.copy_(saved)
        del saved

    def step(self, inputs: StepInputs) -> StepOutputs:
        batch, t = inputs.input_ids.shape
        g, tokens = self._step_graph(batch, t)
        self._pack(g, inputs, tokens)
        return self._run(g, t)

    def step_device(self, tree: DeviceTree, overlap: Callable[[], None]) -> StepOutputs:
        """A step on trees already on the device, padded there: the host neither builds nor uploads
        them, and `overlap()` (the caller's host work) runs while the device verifies."""
        batch, t = tree.ids.shape
        g, tokens = self._step_graph(batch, t)
        host_lengths = _unpack(g.host, batch, tokens)[2]
        host_lengths.copy_(self.torch.as_tensor(self._lengths))
        ids, pos, lengths, mask = _unpack(g.dev, batch, tokens)
        lengths.copy_(host_lengths, non_blocking=True)
        pad_device_step(tree, lengths, tokens, ids, pos, mask)
        return self._run(g, t, overlap)

    def _step_graph(self, batch: int, t: int) -> tuple[_Graph, int]:
        """The static buffers (and graph) of a [batch, t] step, and the bucket it is padded to."""
        if self._cache is None:
            raise BackendError("reset() must be called before step()")
        if batch != self._cache.shape[1]:
            raise BackendError(f"step has batch {batch} but reset() allocated {self._cache.shape[1]}")
        if int(self._lengths.max()) + t > self._cache.shape[3]:
            raise BackendError("KV cache capacity exceeded")
        tokens = bucket_for(t, self.min_bucket, batch)
        if tokens is None or int(self._lengths.max()) + tokens > self._cache.shape[3]:
            tokens = t  # a long prefill: run eagerly at its own size
        return self._graph_for(batch, tokens), tokens

    def _run(self, g: _Graph, t: int, overlap: Callable[[], None] | None = None) -> StepOutputs:
        """Run the packed step (replayed from its graph, captured on first use); `overlap()` runs on the
        host before the one sync per step (the argmax to the host)."""
        torch, batch, tokens = self.torch, g.batch, g.tokens
        if self.use_graphs and tokens in BUCKETS:
            if g.graph is None:
                try:
                    self._capture(g)
                except RuntimeError as exc:  # keep going eagerly rather than fail the generation
                    import warnings

                    warnings.warn(f"torch backend: CUDA graph capture failed, running eagerly: {exc}")
                    self.use_graphs = False
                    torch.cuda.synchronize()
        if self.use_graphs and g.graph is not None:
            g.graph.replay()
            logits, hidden, argmax = g.outputs
        else:
            with torch.inference_mode():
                logits, hidden, argmax = self._forward(g.dev, batch, tokens)
        self.steps += 1
        if overlap is not None:
            overlap()
        host_argmax = argmax[:, :t].cpu().numpy() if self.host_argmax else None  # the one sync per step
        return StepOutputs(logits=LazyHost(logits, t), hidden_states=LazyHost(hidden, t),
                           new_kv=(self._lengths.copy(), t), argmax=host_argmax)

    def commit(self, outputs: StepOutputs, accepted: Sequence[Sequence[int]]) -> None:
        torch = self.torch
        base, t = outputs.new_kv
        if not np.array_equal(base, self._lengths):
            raise BackendError("commit() must follow the step whose rows it commits")
        for b, start, rows in self.checked_rows(accepted, t):
            n = len(rows)
            if rows != list(range(n)):  # rows already in place when the path is contiguous
                src = torch.as_tensor([start + int(r) for r in rows], device=self.device)
                dst = torch.arange(start, start + n, device=self.device)
                view = self._cache[:, b]
                view.index_copy_(2, dst, view.index_select(2, src))
            self._lengths[b] = start + n


def _ordered_attention(head_dim: int):
    """The position-ordered Triton kernel's module (bit-identical plain vs tree steps), or None:
    no Triton, a head dim it does not take, or TREESPEC_TORCH_ATTENTION=sdpa (PyTorch's SDPA
    over the buffer)."""
    if os.environ.get("TREESPEC_TORCH_ATTENTION", "ordered") == "sdpa" or head_dim & (head_dim - 1) or head_dim < 16:
        return None
    try:
        from treespec.plugins.tree_attention import ordered
    except ImportError:
        return None
    return ordered


def requested_gemm() -> str | None:
    """TREESPEC_TORCH_FUSED as a GEMM kind: None for 0 (the unfused step), "cublas" for 1, else its
    value (auto unless set). The fused EAGLE head follows it too."""
    value = os.environ.get("TREESPEC_TORCH_FUSED", "auto")
    return {"0": None, "1": "cublas"}.get(value, value)


def _fused_decoder(decoder, fused: bool | str | None, cuda: bool):
    """The few-kernel step (treespec.models.fused_decoder) when asked for: `fused` True (cuBLAS
    GEMMs), "triton" (Triton GEMMs) or "auto" (Triton for narrow steps, cuBLAS for wide ones), or
    when it is None, on CUDA: TREESPEC_TORCH_FUSED (0, 1 = cublas, triton, auto; auto unless set).
    On the CPU it needs Triton's interpreter (the tests)."""
    if fused is None:
        fused = requested_gemm() if cuda else False
    if not fused:
        return None
    gemm = "cublas" if fused is True else str(fused)
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError("the fused torch step runs on CUDA (on the CPU only under TRITON_INTERPRET=1)")
    from treespec.models.fused_decoder import FusedDecoder  # Triton: an optional heavy dependency

    return FusedDecoder(decoder, gemm)


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

"""ONNX Runtime with device-resident buffers (the `--backend onnxruntime --device cuda` path).

The numpy backend (onnxruntime.py) keeps the KV cache on the host, which the CUDA provider would
copy to the GPU on every step. Here every buffer is a torch tensor on the session's device, bound
to the session by pointer through IOBinding, so nothing but the tree inputs and the argmax crosses
the bus:

* KV cache: one tensor [2*layers, B, KVH, rows, D]; slice 2i is `past_key_i`, 2i+1 `past_value_i`.
  A buffer that is large enough is kept across resets (captured graphs stay valid).
* A step is padded to a bucket (1, 2, 4, ..., 128 tokens; at least `min_bucket` rows with the
  batch's other sequences, 64 for the target on CUDA, so plain decoding and tree verification run
  the same GEMM kernels: see torch_backend).
  Each (batch, bucket) owns static input/output tensors and one IOBinding over them; with CUDA
  graphs ONNX Runtime captures each bucket once (RunOptions `gpu_graph_id`) and replays it.
* The new K/V outputs are bound to slices of one stacked tensor, so `commit` moves the accepted
  rows of all layers with one index_select/index_copy per sequence, on the device.
* Greedy verification reads `argmax` ([B, T] int64, computed on the device); logits and hidden
  states are lazy host views (device_tensors.LazyHost).

It runs on the CPU provider too (torch CPU tensors bound the same way): the tests check it there.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from treespec.errors import BackendError

from treespec.runtime.backends.base import StepInputs, StepOutputs, TreeBackend
from treespec.runtime.backends.device_tensors import BUCKETS, LazyHost, bucket_for, pad_step

ONNX_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16"}


class _Bucket:
    """Static device tensors of one (batch, tokens) step and the IOBinding over them."""

    def __init__(self, backend: "OnnxRuntimeDeviceBackend", batch: int, tokens: int, graph_id: int):
        torch = backend.torch
        dev = backend.torch_device
        self.batch, self.tokens, self.graph_id = batch, tokens, graph_id
        self.ids = torch.zeros((batch, tokens), dtype=torch.int64, device=dev)
        self.pos = torch.zeros((batch, tokens), dtype=torch.int64, device=dev)
        self.mask = torch.zeros((batch, tokens, tokens), dtype=torch.bool, device=dev)
        self.past_lengths = torch.zeros(batch, dtype=torch.int64, device=dev)
        kvh, dim = backend.kv_shape_tail
        self.new_kv = torch.zeros((2 * backend.num_layers, batch, kvh, tokens, dim), dtype=backend.kv_dtype, device=dev)
        self.logits = torch.zeros((batch, tokens, backend.vocab), dtype=backend.out_dtypes["logits"], device=dev)
        self.hidden = torch.zeros((batch, tokens, backend.hidden), dtype=backend.out_dtypes["hidden_states"], device=dev)
        self.binding = backend.session.io_binding()
        bind = backend.bind
        bind(self.binding, "input", "input_ids", self.ids)
        bind(self.binding, "input", "position_ids", self.pos)
        bind(self.binding, "input", "tree_mask", self.mask)
        bind(self.binding, "input", "past_lengths", self.past_lengths)
        for i in range(backend.num_layers):
            bind(self.binding, "input", f"past_key_{i}", backend.cache[2 * i])
            bind(self.binding, "input", f"past_value_{i}", backend.cache[2 * i + 1])
            bind(self.binding, "output", f"new_key_{i}", self.new_kv[2 * i])
            bind(self.binding, "output", f"new_value_{i}", self.new_kv[2 * i + 1])
        bind(self.binding, "output", "logits", self.logits)
        bind(self.binding, "output", "hidden_states", self.hidden)
        self.runs = 0


class OnnxRuntimeDeviceBackend(TreeBackend):
    name = "onnxruntime"

    def __init__(self, session, num_layers: int, num_kv_heads: int, head_dim: int,
                 device: str = "cuda", cuda_graphs: bool = False, min_bucket: int | None = None,
                 host_argmax: bool = True):
        """`session`: an InferenceSession over a tree graph on `device`'s provider, opened with CUDA
        graphs when `cuda_graphs` (runtime/loader.py opens it, and reopens without on refusal)."""
        import torch

        self.torch = torch
        self.device = device
        self.torch_device = torch.device("cuda:0" if device == "cuda" else "cpu")
        self.cuda_graphs = cuda_graphs and device == "cuda"
        self.session = session
        self.num_layers = num_layers
        self.kv_shape_tail = (num_kv_heads, head_dim)
        types = {a.name: ONNX_TYPES.get(a.type, "float32") for a in
                 list(self.session.get_inputs()) + list(self.session.get_outputs())}
        self.kv_dtype = getattr(torch, types.get("past_key_0", "float32"))
        self.out_dtypes = {n: getattr(torch, types.get(n, "float32")) for n in ("logits", "hidden_states")}
        shapes = {o.name: o.shape for o in self.session.get_outputs()}
        self.vocab, self.hidden = int(shapes["logits"][-1]), int(shapes["hidden_states"][-1])
        self.min_bucket = (64 if device == "cuda" else 1) if min_bucket is None else min_bucket
        self.host_argmax = host_argmax
        self.cache = None
        self._capacity = 0
        self._lengths = np.zeros(0, dtype=np.int64)
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._next_graph_id = 0
        self._run_options = {}
        self.steps = 0

    def bind(self, binding, kind: str, name: str, tensor) -> None:
        element = np.dtype(str(tensor.dtype).replace("torch.", "")) if tensor.dtype != self.torch.bfloat16 else None
        if element is None:
            raise BackendError("onnxruntime device backend: bf16 graphs are not supported (export fp16 or fp32)")
        device_type = "cuda" if self.torch_device.type == "cuda" else "cpu"
        args = (name, device_type, 0, element, list(tensor.shape), tensor.data_ptr())
        (binding.bind_input if kind == "input" else binding.bind_output)(*args)

    # ---- cache -------------------------------------------------------------------------------
    def reset(self, batch_size: int, capacity: int) -> None:
        torch = self.torch
        rows = -(-capacity // 256) * 256
        kvh, dim = self.kv_shape_tail
        shape = (2 * self.num_layers, batch_size, kvh, rows, dim)
        current = None if self.cache is None else tuple(self.cache.shape)
        if current is None or current[:3] != shape[:3] or current[3] < rows:
            self._buckets.clear()  # their bindings (and captured graphs) point at the old buffer
            self.cache = None
            self.cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.torch_device)
        self._capacity = capacity
        self._lengths = np.zeros(batch_size, dtype=np.int64)

    def read_cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        n = int(self._lengths.max()) if len(self._lengths) else 0
        return [(self.cache[2 * i, :, :, :n].float().cpu().numpy(), self.cache[2 * i + 1, :, :, :n].float().cpu().numpy())
                for i in range(self.num_layers)]

    def close(self) -> None:
        self._buckets.clear()
        self.cache = None

    # ---- the step ----------------------------------------------------------------------------
    def _bucket(self, batch: int, tokens: int) -> _Bucket:
        key = (batch, tokens)
        bucket = self._buckets.get(key)
        if bucket is None:
            graph_id = -1
            if self.cuda_graphs and tokens in BUCKETS:
                graph_id = self._next_graph_id  # never reused: ORT keeps a captured graph per id
                self._next_graph_id += 1
            bucket = _Bucket(self, batch, tokens, graph_id)
            if tokens in BUCKETS:  # odd-sized long prefills are not kept
                self._buckets[key] = bucket
        return bucket

    def _fill(self, bucket: _Bucket, inputs: StepInputs) -> None:
        torch = self.torch
        ids, pos, mask = pad_step(inputs.input_ids, inputs.position_ids, inputs.tree_mask, self._lengths,
                                  bucket.tokens)
        bucket.ids.copy_(torch.from_numpy(ids))
        bucket.pos.copy_(torch.from_numpy(pos))
        bucket.mask.copy_(torch.from_numpy(mask))
        bucket.past_lengths.copy_(torch.from_numpy(self._lengths))

    def _run(self, bucket: _Bucket) -> None:
        import onnxruntime as ort

        if self.torch_device.type == "cuda":
            self.torch.cuda.current_stream().synchronize()  # ORT runs on its own stream
        options = None
        if self.cuda_graphs:  # -1: run without a graph (ORT would otherwise capture into id 0)
            options = self._run_options.get(bucket.graph_id)
            if options is None:
                options = self._run_options[bucket.graph_id] = ort.RunOptions()
                options.add_run_config_entry("gpu_graph_id", str(bucket.graph_id))
        self.session.run_with_iobinding(bucket.binding, options)
        bucket.runs += 1

    def step(self, inputs: StepInputs) -> StepOutputs:
        if self.cache is None:
            raise BackendError("reset() must be called before step()")
        batch, t = inputs.input_ids.shape
        if batch != self.cache.shape[1]:
            raise BackendError(f"step has batch {batch} but reset() allocated {self.cache.shape[1]}")
        if int(self._lengths.max()) + t > self.cache.shape[3]:
            raise BackendError("KV cache capacity exceeded")
        tokens = bucket_for(t, self.min_bucket, batch) or t  # a long prefill runs at its own size
        bucket = self._bucket(batch, tokens)
        self._fill(bucket, inputs)
        self._run(bucket)
        self.steps += 1
        argmax = bucket.logits[:, :t].argmax(-1).cpu().numpy() if self.host_argmax else None
        return StepOutputs(logits=LazyHost(bucket.logits, t), hidden_states=LazyHost(bucket.hidden, t),
                           new_kv=(self._lengths.copy(), t, bucket.new_kv), argmax=argmax)

    def commit(self, outputs: StepOutputs, accepted: Sequence[Sequence[int]]) -> None:
        torch = self.torch
        base, t, new_kv = outputs.new_kv
        if not np.array_equal(base, self._lengths):
            raise BackendError("commit() must follow the step whose rows it commits")
        for b, start, rows in self.checked_rows(accepted, t):
            n = len(rows)
            src = new_kv[:, b]
            if rows != list(range(n)):
                src = src.index_select(2, torch.as_tensor(rows, device=self.torch_device))
            self.cache[:, b, :, start:start + n] = src[:, :, :n]
            self._lengths[b] = start + n

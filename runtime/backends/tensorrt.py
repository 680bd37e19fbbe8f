"""TensorRT and TensorRT-RTX backend: a tree graph's engine behind the TreeBackend interface.

Never executed by this project: full TensorRT cannot be installed on its machines and TensorRT-RTX
refuses their H100/H200 GPUs. It is written from the TensorRT documentation and type-checked in
CI with mypy against tensorrt-stubs (tests/test_typing_tensorrt.py); engine loading up to
deserialisation (record, size, SHA-256, builder and version checks) is tested on the CPU.

Device memory is torch.cuda tensors, allocated by reset() and bound to every context once:
- KV cache: one tensor [2L, B, KVH, C, D]; slot 2i is past_key_i and 2i+1 past_value_i, each a
  contiguous [B, KVH, C, D] view bound in place (the engine reads it, never a copy).
- New K/V rows: one tensor [2L, B*KVH*Tmax*D]. For a step of T tokens the first B*KVH*T*D
  elements of slot j are new_key/new_value [B, KVH, T, D], so addresses never change with T, and
  commit() moves the accepted rows of every layer with one gather and one scatter on the device.
- Tree inputs, logits and hidden states: flat buffers for the largest T, used as [B, T, ...].
- One execution context per optimisation profile (engine_profiles.py: "tree", and "prefill" for
  long prompts); a step takes the first profile whose ranges hold its B and T. Input shapes are
  set only when they change.
- cuda_graphs=True: TensorRT: the first step of each (profile, B, T) runs eagerly on a context of
  its own, which is then captured; later steps of that shape replay the graph (a graph fixes the
  shapes, addresses and context it was captured with). TensorRT-RTX captures by itself
  (IRuntimeConfig's WHOLE_GRAPH_CAPTURE), since only it knows when its JIT kernels are ready.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from treespec.errors import BackendError

from treespec.runtime.backends.base import StepInputs, StepOutputs, TreeBackend
from treespec.engine_record import check_engine, deserialize_engine, made_by, read_sidecar
from treespec.trt_api import RuntimeCache, TrtApi
from treespec.errors import ArtifactError

if TYPE_CHECKING:
    import tensorrt as trt

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
                 "INT64": torch.int64, "INT32": torch.int32, "BOOL": torch.bool}
_TREE_INPUTS = ("input_ids", "position_ids", "tree_mask", "past_lengths")
MAX_CUDA_GRAPHS = 32  # distinct (profile, B, T) shapes captured; later new shapes run eagerly


@dataclass(frozen=True)
class NewRows:
    """StepOutputs.new_kv of this backend: which step's rows sit in the new-K/V buffer."""

    step: int
    batch: int
    tokens: int


@dataclass(frozen=True)
class _Profile:
    """An engine optimisation profile, read back from the engine: (min, opt, max) per axis."""

    batch: tuple[int, int, int]
    tokens: tuple[int, int, int]
    past: tuple[int, int, int]

    def holds(self, batch: int, tokens: int, past: int) -> bool:
        return (self.batch[0] <= batch <= self.batch[2] and self.tokens[0] <= tokens <= self.tokens[2]
                and self.past[0] <= past <= self.past[2])


@dataclass
class _Graph:
    context: "trt.IExecutionContext"
    graph: torch.cuda.CUDAGraph


class TensorRTBackend(TreeBackend):
    name = "tensorrt"

    def __init__(self, engine_path: Path, record: Mapping[str, Any] | None = None, *, device: str = "cuda",
                 cuda_graphs: bool = False, runtime_cache: Path | None = None) -> None:
        self.record = dict(record) if record is not None else read_sidecar(engine_path)
        blob = check_engine(engine_path, self.record)  # size, SHA-256, builder and version
        self.api = TrtApi.load(str(self.record["builder"]))
        self.name = self.api.builder
        self._origin = made_by(self.record)
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendError(f"{self._origin} needs a CUDA GPU (device '{device}' is not one): "
                               "use --backend onnxruntime here")
        index: int | None = self.device.index  # None for plain "cuda" (torch's stubs say int)
        if index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        self._runtime, self.engine = deserialize_engine(self.api, blob, self.record)
        del blob
        self._read_io()
        self.cuda_graphs = cuda_graphs
        self._stream = torch.cuda.Stream(device=self.device)
        self._cache_file = self.api.open_runtime_cache(self.engine, runtime_cache)
        self._scratch = self._allocate_scratch()
        self._contexts = [self._profile_context(p) for p in range(len(self.profiles))]
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._eager: set[tuple[int, int, int]] = set()
        self._shapes: list[tuple[int, int] | None] = [None] * len(self._contexts)
        self._buffers: dict[str, torch.Tensor] = {}
        self._staging: dict[str, torch.Tensor] = {}
        self._lengths = np.zeros(0, dtype=np.int64)
        self._batch = 0
        self._capacity = 0
        self._tmax = 0
        self._step = 0

    # -- engine I/O --------------------------------------------------------------------------------

    def _read_io(self) -> None:
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n).name == "INPUT"]
        self.outputs = [n for n in names if engine.get_tensor_mode(n).name == "OUTPUT"]
        self.num_layers = sum(1 for n in self.inputs if n.startswith("past_key_"))
        expected = list(_TREE_INPUTS) + [f"past_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]
        wanted_out = ["logits", "hidden_states"] + [f"new_{kind}_{i}" for i in range(self.num_layers)
                                                    for kind in ("key", "value")]
        missing = sorted(set(expected) - set(self.inputs)) + sorted(set(wanted_out) - set(self.outputs))
        extra = sorted(set(self.inputs) - set(expected))
        if self.num_layers == 0 or missing or extra:
            raise ArtifactError(f"{self._origin} does not have the tree-graph I/O (missing {missing}, "
                                f"unexpected inputs {extra})")
        self.dtypes = {n: self._torch_dtype(n) for n in names}
        kv_shape = engine.get_tensor_shape("past_key_0")
        self.kv_heads, self.head_dim = kv_shape[1], kv_shape[3]
        self.vocab_size = engine.get_tensor_shape("logits")[2]
        self.hidden_size = engine.get_tensor_shape("hidden_states")[2]
        self.profiles = [self._engine_profile(p) for p in range(engine.num_optimization_profiles)]

    def _torch_dtype(self, name: str) -> torch.dtype:
        kind = self.engine.get_tensor_dtype(name).name
        if kind not in _TORCH_DTYPES:
            raise ArtifactError(f"{self._origin}: tensor {name} has unsupported dtype {kind}")
        return _TORCH_DTYPES[kind]

    def _engine_profile(self, index: int) -> _Profile:
        ids = self.engine.get_tensor_profile_shape("input_ids", index)
        past = self.engine.get_tensor_profile_shape("past_key_0", index)
        return _Profile(batch=(ids[0][0], ids[1][0], ids[2][0]), tokens=(ids[0][1], ids[1][1], ids[2][1]),
                        past=(past[0][2], past[1][2], past[2][2]))

    def _allocate_scratch(self) -> torch.Tensor | None:
        if not self.api.uses_shared_scratch:
            return None
        return torch.empty(max(1, self.engine.device_memory_size_v2), dtype=torch.uint8, device=self.device)

    def _new_context(self, profile: int) -> "trt.IExecutionContext | None":
        """A context on `profile`, or None if TensorRT refuses a second context on that profile."""
        scratch = None if self._scratch is None else (self._scratch.data_ptr(), self._scratch.numel())
        context = self.api.execution_context(self.engine, self._cache_file, self.cuda_graphs, scratch)
        return context if context.set_optimization_profile_async(profile, self._stream.cuda_stream) else None

    def _profile_context(self, profile: int) -> "trt.IExecutionContext":
        context = self._new_context(profile)
        if context is None:
            raise BackendError(f"{self._origin}: cannot select optimisation profile {profile}")
        return context

    # -- TreeBackend -------------------------------------------------------------------------------

    def reset(self, batch_size: int, capacity: int) -> None:
        usable = [p for p in self.profiles if p.holds(batch_size, p.tokens[0], capacity)]
        if not usable:
            ranges = "; ".join(f"batch {p.batch[0]}..{p.batch[2]}, past {p.past[0]}..{p.past[2]}"
                               for p in self.profiles)
            raise BackendError(f"{self._origin} was built for {ranges}: batch {batch_size} with capacity "
                               f"{capacity} is outside it (rebuild with a larger profile)")
        self._release_buffers()
        tmax = max(p.tokens[2] for p in usable)
        layers2, dev = 2 * self.num_layers, self.device
        kv_dtype = self.dtypes["past_key_0"]
        cells = batch_size * self.kv_heads * tmax * self.head_dim
        self._buffers = {
            "kv": torch.zeros((layers2, batch_size, self.kv_heads, capacity, self.head_dim), dtype=kv_dtype, device=dev),
            "new": torch.empty((layers2, cells), dtype=self.dtypes["new_key_0"], device=dev),
            "input_ids": torch.empty(batch_size * tmax, dtype=torch.int64, device=dev),
            "position_ids": torch.empty(batch_size * tmax, dtype=torch.int64, device=dev),
            "tree_mask": torch.empty(batch_size * tmax * tmax, dtype=torch.bool, device=dev),
            "past_lengths": torch.zeros(batch_size, dtype=torch.int64, device=dev),
            "logits": torch.empty(batch_size * tmax * self.vocab_size, dtype=self.dtypes["logits"], device=dev),
            "hidden_states": torch.empty(batch_size * tmax * self.hidden_size, dtype=self.dtypes["hidden_states"],
                                         device=dev),
        }
        self._staging = {name: torch.empty(self._buffers[name].numel(), dtype=self._buffers[name].dtype,
                                           pin_memory=True) for name in _TREE_INPUTS}
        self._batch, self._capacity, self._tmax = batch_size, capacity, tmax
        self._lengths = np.zeros(batch_size, dtype=np.int64)
        for context in self._contexts:
            self._bind(context)

    def step(self, inputs: StepInputs) -> StepOutputs:
        if not self._buffers:
            raise BackendError("reset() must be called before step()")
        ids = np.ascontiguousarray(inputs.input_ids, dtype=np.int64)
        batch, tokens = ids.shape
        if batch != self._batch:
            raise BackendError(f"step() got {batch} sequences but reset() made room for {self._batch}")
        if tokens < 1 or tokens > self._tmax:
            raise BackendError(f"{tokens} tree tokens: this engine takes 1..{self._tmax}")
        if int(self._lengths.max()) + tokens > self._capacity:
            raise BackendError("KV cache capacity exceeded")
        profile = self._profile_for(batch, tokens)
        n = batch * tokens
        host = {
            "input_ids": ids.reshape(-1),
            "position_ids": np.ascontiguousarray(inputs.position_ids, dtype=np.int64).reshape(-1),
            "tree_mask": np.ascontiguousarray(inputs.tree_mask, dtype=np.bool_).reshape(-1),
            "past_lengths": self._lengths,
        }
        with torch.cuda.stream(self._stream):
            for name, values in host.items():
                size = values.size
                self._staging[name][:size].numpy()[:] = values
                self._buffers[name][:size].copy_(self._staging[name][:size], non_blocking=True)
            self._execute(profile, batch, tokens)
            logits = self._to_host(self._buffers["logits"][: n * self.vocab_size].view(batch, tokens, self.vocab_size))
            hidden = self._to_host(
                self._buffers["hidden_states"][: n * self.hidden_size].view(batch, tokens, self.hidden_size))
        self._stream.synchronize()
        self._step += 1
        return StepOutputs(logits=logits.numpy(), hidden_states=hidden.numpy(),
                           new_kv=NewRows(self._step, batch, tokens))

    def commit(self, outputs: StepOutputs, accepted: Sequence[Sequence[int]]) -> None:
        rows = outputs.new_kv
        if not isinstance(rows, NewRows) or rows.step != self._step:
            raise BackendError("commit() takes the outputs of the latest step(): a later step has "
                               "overwritten the K/V rows of earlier ones")
        if len(accepted) != rows.batch:
            raise BackendError(f"commit() got {len(accepted)} row lists for {rows.batch} sequences")
        seq: list[int] = []
        src: list[int] = []
        dst: list[int] = []
        for b, picked in enumerate(accepted):
            start = int(self._lengths[b])
            if start + len(picked) > self._capacity:
                raise BackendError("KV cache capacity exceeded")
            if any(not 0 <= int(i) < rows.tokens for i in picked):
                raise BackendError(f"accepted rows {list(picked)} are outside 0..{rows.tokens - 1}")
            seq += [b] * len(picked)
            src += [int(i) for i in picked]
            dst += range(start, start + len(picked))
        if not seq:
            return
        with torch.cuda.stream(self._stream):
            index = torch.tensor([seq, src, dst], dtype=torch.int64).to(self.device)
            move_rows(self._buffers["kv"], self._buffers["new"], rows.batch, rows.tokens, index)
        for b, picked in enumerate(accepted):
            self._lengths[b] += len(picked)

    def read_cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        self._stream.synchronize()
        kv = self._buffers["kv"]
        host = (kv.float() if kv.dtype == torch.bfloat16 else kv).cpu().numpy()
        return [(host[2 * i].copy(), host[2 * i + 1].copy()) for i in range(self.num_layers)]

    def close(self) -> None:
        if self._cache_file is not None:
            self._stream.synchronize()
            self._cache_file.save()
        self._release_buffers()
        self._contexts = []  # contexts before the engine, which goes with this object
        self._scratch = None

    # -- internals ---------------------------------------------------------------------------------

    def _profile_for(self, batch: int, tokens: int) -> int:
        for index, profile in enumerate(self.profiles):
            if profile.holds(batch, tokens, self._capacity):
                return index
        raise BackendError(f"{self._origin} has no optimisation profile for batch {batch}, {tokens} tree "
                           f"tokens and capacity {self._capacity}")

    def _bind(self, context: "trt.IExecutionContext") -> None:
        kv, new = self._buffers["kv"], self._buffers["new"]
        addresses = {name: self._buffers[name].data_ptr()
                     for name in (*_TREE_INPUTS, "logits", "hidden_states")}
        for i in range(self.num_layers):
            for slot, kind in ((2 * i, "key"), (2 * i + 1, "value")):
                addresses[f"past_{kind}_{i}"] = kv[slot].data_ptr()
                addresses[f"new_{kind}_{i}"] = new[slot].data_ptr()
        for name, pointer in addresses.items():
            if not context.set_tensor_address(name, pointer):
                raise BackendError(f"{self._origin}: cannot bind tensor {name}")

    def _set_shapes(self, context: "trt.IExecutionContext", batch: int, tokens: int) -> None:
        cache = (batch, self.kv_heads, self._capacity, self.head_dim)
        shapes: dict[str, tuple[int, ...]] = {
            "input_ids": (batch, tokens), "position_ids": (batch, tokens),
            "tree_mask": (batch, tokens, tokens), "past_lengths": (batch,),
        }
        shapes.update({name: cache for name in self.inputs if name.startswith("past_") and name != "past_lengths"})
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise BackendError(f"{self._origin}: input {name} {shape} is outside the engine's profile")

    def _execute(self, profile: int, batch: int, tokens: int) -> None:
        """Run the engine on the stream: replay a captured graph, or run (and maybe capture)."""
        key = (profile, batch, tokens)
        captured = self._graphs.get(key)
        if captured is not None:
            captured.graph.replay()
            return
        if self._wants_graph(key):
            dedicated = self._new_context(profile)
            if dedicated is not None:
                self._bind(dedicated)
                self._set_shapes(dedicated, batch, tokens)
                self._enqueue(dedicated)  # this step's result, and the run TensorRT wants before a capture
                self._capture(key, dedicated)
                return
            self._eager.add(key)  # this TensorRT allows one context per profile: no graph for it
        context = self._contexts[profile]
        if self._shapes[profile] != (batch, tokens):
            self._set_shapes(context, batch, tokens)
            self._shapes[profile] = (batch, tokens)
        self._enqueue(context)

    def _wants_graph(self, key: tuple[int, int, int]) -> bool:
        return (self.cuda_graphs and not self.api.captures_cuda_graphs_itself and key not in self._eager
                and len(self._graphs) < MAX_CUDA_GRAPHS)

    def _capture(self, key: tuple[int, int, int], context: "trt.IExecutionContext") -> None:
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                self._enqueue(context)
        except RuntimeError:  # not stream-capturable (e.g. data-dependent shapes): stay eager
            self._eager.add(key)
            return
        self._graphs[key] = _Graph(context, graph)

    def _enqueue(self, context: "trt.IExecutionContext") -> None:
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise BackendError(f"{self._origin}: execute_async_v3 failed (see the TensorRT log)")

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Pinned host copy (float32 for bfloat16, which numpy lacks), ready after synchronize."""
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    def _release_buffers(self) -> None:
        self._graphs.clear()  # graphs hold the old addresses
        self._eager.clear()
        self._shapes = [None] * len(self._contexts)
        self._buffers = {}
        self._staging = {}


def move_rows(kv: torch.Tensor, new: torch.Tensor, batch: int, tokens: int, index: torch.Tensor) -> None:
    """Copy new K/V rows into the cache, every layer at once, on the tensors' device.

    kv: [2L, B, KVH, C, D]; new: [2L, >= B*KVH*tokens*D] whose prefix is [2L, B, KVH, tokens, D];
    index: int64 [3, N] = (sequence, source row in the step, destination row in the cache).
    """
    layers2, _, heads, _, dim = kv.shape
    rows = new[:, : batch * heads * tokens * dim].view(layers2, batch, heads, tokens, dim)
    # Advanced indices on axes 1 and 3 put the N rows first on both sides: [N, 2L, KVH, D].
    kv[:, index[0], :, index[2]] = rows[:, index[0], :, index[1]]

"""ONNX Runtime backend: one InferenceSession over a tree graph, KV cache bound in place.

The cache buffers are numpy arrays wrapped as OrtValues once per `reset`; each step binds them
by reference through IOBinding, so ONNX Runtime reads the cache where it lies. Only the accepted
rows of the `new_key_i` / `new_value_i` outputs are copied into the buffers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from treespec.errors import BackendError

from treespec.runtime.backends.base import StepInputs, StepOutputs, TreeBackend
from treespec.errors import ArtifactError

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class CudaGraphsUnavailable(RuntimeError):
    """The CUDA provider refused graph capture (e.g. nodes placed on the CPU): open without."""


def open_session(path: Path, device: str = "cpu", threads: int | None = None, cuda_graphs: bool = False,
                 spinning: bool = True):
    """An InferenceSession over a tree graph. `spinning` False: its CPU threads sleep as soon as a run
    ends instead of spinning for more work (a drafter's session: see runtime/loader.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device == "cuda":
        import torch  # noqa: F401  (loads the CUDA libraries the provider links against)

        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:  # the libraries may be found the usual way instead
                pass
        # fp32 graphs in true fp32: TF32 GEMMs round like fp16 ones, and plain and tree steps
        # would drift apart at near-tie argmaxes (see the README's ONNX Runtime CUDA section).
        cuda = {"device_id": 0, "use_tf32": "0"}
        if cuda_graphs:
            cuda["enable_cuda_graph"] = "1"
        providers: list = [("CUDAExecutionProvider", cuda)]
    elif device == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise BackendError(f"onnxruntime backend: unknown device '{device}' (use cpu or cuda)")
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for corrupt files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if cuda_graphs:
            raise CudaGraphsUnavailable(first) from None
        raise ArtifactError(f"ONNX Runtime cannot load {path.name}: {first}") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise BackendError("onnxruntime: CUDAExecutionProvider unavailable (install onnxruntime-gpu "
                           "matching this machine's CUDA)")
    return session


class OnnxRuntimeBackend(TreeBackend):
    name = "onnxruntime"

    def __init__(self, session, num_layers: int, num_kv_heads: int, head_dim: int,
                 precision: str = "fp32", device: str = "cpu"):
        """`session`: an InferenceSession over a tree graph (open_session; runtime/loader.py)."""
        self.session = session
        self.num_layers = num_layers
        self.kv_shape_tail = (num_kv_heads, head_dim)
        self.dtype = NUMPY_DTYPES.get(precision, np.float32)
        self.device = device
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._cache: list[np.ndarray] = []
        self._lengths = np.zeros(0, dtype=np.int64)
        self._capacity = 0
        self._binding = None

    def reset(self, batch_size: int, capacity: int) -> None:
        import onnxruntime as ort

        heads, dim = self.kv_shape_tail
        shape = (batch_size, heads, capacity, dim)
        if not self._cache or self._cache[0].shape != shape:
            self._cache = [np.zeros(shape, dtype=self.dtype) for _ in range(2 * self.num_layers)]
            binding = self.session.io_binding()
            for i, buf in enumerate(self._cache):
                kind = "key" if i % 2 == 0 else "value"
                binding.bind_ortvalue_input(f"past_{kind}_{i // 2}", ort.OrtValue.ortvalue_from_numpy(buf))
            self._binding = binding
        self._lengths = np.zeros(batch_size, dtype=np.int64)
        self._capacity = capacity

    def step(self, inputs: StepInputs) -> StepOutputs:
        if self._binding is None:
            raise BackendError("reset() must be called before step()")
        binding = self._binding
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(inputs.input_ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(inputs.position_ids, dtype=np.int64))
        binding.bind_cpu_input("tree_mask", np.ascontiguousarray(inputs.tree_mask, dtype=np.bool_))
        binding.bind_cpu_input("past_lengths", self._lengths.copy())
        for name in self.output_names:  # outputs change shape with T: let ORT allocate them
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        outs = dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
        new_kv = [outs[f"new_{kind}_{i}"] for i in range(self.num_layers) for kind in ("key", "value")]
        return StepOutputs(logits=outs["logits"], hidden_states=outs["hidden_states"], new_kv=new_kv)

    def commit(self, outputs: StepOutputs, accepted: Sequence[Sequence[int]]) -> None:
        tokens = outputs.new_kv[0].shape[2] if outputs.new_kv else 0
        for b, start, rows in self.checked_rows(accepted, tokens):
            n = len(rows)
            idx = np.asarray(rows, dtype=np.int64)
            for buf, new in zip(self._cache, outputs.new_kv):
                buf[b, :, start:start + n] = new[b][:, idx]
            self._lengths[b] = start + n

    def read_cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for i in range(self.num_layers):
            k, v = self._cache[2 * i], self._cache[2 * i + 1]
            out.append((k.copy(), v.copy()))
        return out

    def close(self) -> None:
        self._binding = None
        self._cache = []

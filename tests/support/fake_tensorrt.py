"""A stand-in for the `tensorrt` runtime API, to run TensorRTBackend on a GPU without TensorRT.

Only the calls TensorRTBackend makes exist. The "engine" is a JSON blob naming a TinyTreeDecoder
(tests/tiny_tree_graphs.py) and its optimisation profiles; an execution context runs that model
in torch on the stream it is given, reading its inputs from and writing its outputs to the raw
device addresses bound with set_tensor_address (through __cuda_array_interface__), exactly where
TensorRT would. So everything the backend does around the engine (buffers, bindings, shapes,
profiles, copies, commit, CUDA-graph capture and replay) runs for real; only TensorRT's kernels
are replaced. Nothing here is used outside tests.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from support import tiny_tree_graphs as tiny

__version__ = "10.99.0+fake"
_TYPESTR = {torch.int64: "<i8", torch.bool: "|b1", torch.float32: "<f4", torch.float16: "<f2"}
_NAMES = {torch.int64: "INT64", torch.bool: "BOOL", torch.float32: "FLOAT", torch.float16: "HALF"}


class _Enum:
    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Enum) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class TensorIOMode:
    INPUT = _Enum("INPUT")
    OUTPUT = _Enum("OUTPUT")


class ExecutionContextAllocationStrategy:
    STATIC = _Enum("STATIC")
    USER_MANAGED = _Enum("USER_MANAGED")


class ILogger:
    def __init__(self) -> None:
        pass


class Builder:  # TrtApi.load checks that the module has one
    pass


def engine_blob(seed: int, precision: str, profiles: list[dict[str, list[int]]]) -> bytes:
    return json.dumps({"fake_engine": True, "seed": seed, "precision": precision, "profiles": profiles}).encode()


class Runtime:
    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, blob: bytes) -> "FakeEngine | None":
        try:
            spec = json.loads(bytes(blob))
        except ValueError:
            return None
        return FakeEngine(spec) if spec.get("fake_engine") else None


class _CudaArray:
    def __init__(self, pointer: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": _TYPESTR[dtype], "data": (pointer, False),
                                         "version": 2, "strides": None}


class FakeEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.dtype = tiny.TORCH_DTYPES[spec["precision"]]
        self.model = tiny.TinyTreeDecoder(spec["seed"]).to(self.dtype).cuda().eval()
        self.profiles = spec["profiles"]
        self.inputs = tiny.input_names()
        self.outputs = tiny.output_names()
        self.names = self.inputs + self.outputs
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(self.profiles)
        self.device_memory_size_v2 = 4096

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> _Enum:
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def torch_dtype(self, name: str) -> torch.dtype:
        if name in ("input_ids", "position_ids", "past_lengths"):
            return torch.int64
        if name == "tree_mask":
            return torch.bool
        return torch.float32 if name == "logits" else self.dtype

    def get_tensor_dtype(self, name: str) -> _Enum:
        return _Enum(_NAMES[self.torch_dtype(name)])

    def get_tensor_shape(self, name: str) -> list[int]:
        if name.startswith(("past_key", "past_value", "new_key", "new_value")):
            return [-1, tiny.KV_HEADS, -1, tiny.HEAD_DIM]
        return {"logits": [-1, -1, tiny.VOCAB], "hidden_states": [-1, -1, tiny.HIDDEN]}.get(name, [-1, -1])

    def get_tensor_profile_shape(self, name: str, index: int) -> list[list[int]]:
        prof = self.profiles[index]
        if name == "input_ids":
            return [[prof["batch"][i], prof["tree_tokens"][i]] for i in range(3)]
        return [[prof["batch"][i], tiny.KV_HEADS, prof["past"][i], tiny.HEAD_DIM] for i in range(3)]

    def create_execution_context(self, strategy: Any = None) -> "FakeContext":
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.profile = -1
        self.device_memory: tuple[int, int] | None = None
        self.runs = 0

    def set_device_memory(self, pointer: int, size: int) -> None:
        assert size >= self.engine.device_memory_size_v2
        self.device_memory = (pointer, size)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return 0 <= index < len(self.engine.profiles)

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.addresses[name] = pointer
        return name in self.engine.names

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        prof = self.engine.profiles[self.profile]
        batch, tokens = shape[0], (shape[1] if name != "past_lengths" and not name.startswith("past_") else None)
        ok = prof["batch"][0] <= batch <= prof["batch"][2]
        if tokens is not None:
            ok = ok and prof["tree_tokens"][0] <= tokens <= prof["tree_tokens"][2]
        if name.startswith(("past_key", "past_value")):
            ok = ok and prof["past"][0] <= shape[2] <= prof["past"][2]
        self.shapes[name] = tuple(shape)
        return ok

    def _view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        array = _CudaArray(self.addresses[name], shape, self.engine.torch_dtype(name))
        return torch.as_tensor(array, device="cuda")

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine = self.engine
        if self.device_memory is None or set(self.addresses) != set(engine.names) or set(self.shapes) != set(engine.inputs):
            return False
        batch, tokens = self.shapes["input_ids"]
        with torch.no_grad(), torch.cuda.stream(torch.cuda.ExternalStream(stream_handle)):
            args = [self._view(name, self.shapes[name]) for name in engine.inputs]
            outputs = engine.model(*args)
            kv_out = (batch, tiny.KV_HEADS, tokens, tiny.HEAD_DIM)
            shapes = [(batch, tokens, tiny.VOCAB), (batch, tokens, tiny.HIDDEN)] + [kv_out] * (2 * tiny.LAYERS)
            for name, shape, value in zip(engine.outputs, shapes, outputs):
                self._view(name, shape).copy_(value)
        self.runs += 1
        return True

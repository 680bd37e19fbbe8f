"""Run the AOT PTX the way TensorRT does: CUDA driver API, no Triton launcher.

`cuModuleLoadData` on `CompiledKernel.trt_ptx`, then `cuLaunchKernel` with the grid, block and
dynamic shared memory of `aot.plan_launch` and a `void**` array holding exactly the arguments of
`aot.KERNEL_ARGS`: input pointers, int32 scalars, output pointer. Two bindings of the same driver
calls: cuda-python (`cuda.bindings.driver`) and plain ctypes on libcuda. The caller's current
CUDA context is used (torch makes the primary context current once it has touched the GPU).
"""
from __future__ import annotations

import ctypes
from typing import Any, Sequence

from .aot import KERNEL_ARGS, KERNEL_INPUTS, KERNEL_OUTPUTS, CompiledKernel, LaunchPlan

_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_DEFAULT_SHARED_LIMIT = 48 * 1024


def pack_arguments(inputs: Sequence[int], scalars: Sequence[int], outputs: Sequence[int]) -> tuple[list[Any], Any]:
    """(owned values, void*[n]) in KERNEL_ARGS order; keep the values alive until the launch."""
    if (len(inputs), len(scalars), len(outputs)) != (len(KERNEL_INPUTS), len(KERNEL_ARGS) - len(KERNEL_INPUTS) - len(KERNEL_OUTPUTS), len(KERNEL_OUTPUTS)):
        raise ValueError("argument counts do not match aot.KERNEL_ARGS")
    values: list[Any] = [ctypes.c_void_p(p) for p in inputs]
    values += [ctypes.c_int32(s) for s in scalars]
    values += [ctypes.c_void_p(p) for p in outputs]
    array = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    return values, array


class _CtypesDriver:
    name = "ctypes-libcuda"

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self._check(self.lib.cuInit(0))

    def _check(self, status: int) -> None:
        if status != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(text))
            raise RuntimeError(f"CUDA driver error {status}: {(text.value or b'?').decode()}")

    def load(self, image: bytes, name: str) -> Any:
        self._image = ctypes.create_string_buffer(image)  # NUL-terminated PTX
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self.lib.cuModuleLoadData(ctypes.byref(module), self._image))
        self._check(self.lib.cuModuleGetFunction(ctypes.byref(function), module, name.encode()))
        return function

    def set_shared(self, function: Any, nbytes: int) -> None:
        self._check(self.lib.cuFuncSetAttribute(function, _MAX_DYNAMIC_SHARED, ctypes.c_int(nbytes)))

    def launch(self, function: Any, plan: LaunchPlan, stream: int, array: Any) -> None:
        dims = [ctypes.c_uint(v) for v in (*plan.grid, *plan.block, plan.shared_mem)]
        self._check(self.lib.cuLaunchKernel(function, *dims, ctypes.c_void_p(stream), array, None))


class _CudaPythonDriver:
    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import driver
        except ImportError:  # cuda-python < 12.6
            from cuda import cuda as driver
        self.cu = driver
        self._call(driver.cuInit(0))

    def _call(self, result: Any) -> Any:
        err, *rest = result
        if err != self.cu.CUresult.CUDA_SUCCESS:
            _, text = self.cu.cuGetErrorString(err)
            raise RuntimeError(f"CUDA driver error {err}: {text!r}")
        return rest[0] if len(rest) == 1 else rest

    def load(self, image: bytes, name: str) -> Any:
        self._image = ctypes.create_string_buffer(image)
        module = self._call(self.cu.cuModuleLoadData(ctypes.addressof(self._image)))
        return self._call(self.cu.cuModuleGetFunction(module, name.encode()))

    def set_shared(self, function: Any, nbytes: int) -> None:
        attribute = self.cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        self._call(self.cu.cuFuncSetAttribute(function, attribute, nbytes))

    def launch(self, function: Any, plan: LaunchPlan, stream: int, array: Any) -> None:
        self._call(self.cu.cuLaunchKernel(function, *plan.grid, *plan.block, plan.shared_mem,
                                          self.cu.CUstream(stream), ctypes.addressof(array), 0))


DRIVERS: dict[str, type[_CudaPythonDriver] | type[_CtypesDriver]] = {"cuda-python": _CudaPythonDriver,
                                                                   "ctypes": _CtypesDriver}


class PtxKernel:
    """One loaded AOT kernel. launch() takes device pointers; nothing else is implied."""

    def __init__(self, kernel: CompiledKernel, driver: str = "cuda-python"):
        self.kernel = kernel
        self.driver = DRIVERS[driver]()
        self.function = self.driver.load(kernel.trt_ptx.encode(), kernel.name)
        if kernel.shared_mem > _DEFAULT_SHARED_LIMIT:  # aot.fit_shared_memory avoids this for TensorRT
            self.driver.set_shared(self.function, kernel.shared_mem)

    def launch(self, plan: LaunchPlan, inputs: Sequence[int], outputs: Sequence[int], stream: int = 0) -> None:
        values, array = pack_arguments(inputs, plan.scalars, outputs)
        self.driver.launch(self.function, plan, stream, array)
        del values

"""TensorRT Quick Deployable Plugin `treespec::TreeAttention` (ahead-of-time implementation).

Import this module before building an engine from an ONNX graph exported with
`--attention plugin`: the decorators register the plugin creator with TensorRT's registry, and
the ONNX parser maps each `TreeAttention` node (attributes `plugin_namespace="treespec"`,
`aot=1`, `scale`) to it. At build time `aot_impl` compiles the Triton kernel for the build GPU
and hands TensorRT its PTX, launch grid/block/shared memory and the int32 scalar arguments as
shape expressions; the engine embeds the PTX, so running it needs neither Python nor Triton.

I/O (see aot.KERNEL_ARGS): q, k_new, v_new, past_k, past_v in fp32/fp16/bf16 (one dtype),
past_lengths int32 [B], tree_mask int32 [B, T, T]; out like q. Linear formats only. Tactics
are the tile configurations of config.TACTICS; TensorRT times them and keeps the fastest.

No `from __future__ import annotations` here: tensorrt.plugin inspects the annotations at
decoration time and needs real classes.
"""
import tensorrt as trt
import tensorrt.plugin as trtp

from .aot import KERNEL_SCALARS, fit_shared_memory, grid_dims
from .config import TACTICS, tactic_config

PLUGIN_ID = "treespec::TreeAttention"
PLUGIN_NAMESPACE, PLUGIN_NAME = PLUGIN_ID.split("::")
_FLOAT_TYPES = "FP32|FP16|BF16"


def kernel_dtype(dtype: trt.DataType) -> str:
    if dtype == trt.float16:
        return "fp16"
    if dtype == trt.bfloat16:
        return "bf16"
    if dtype == trt.float32:
        return "fp32"
    raise ValueError(f"TreeAttention supports fp32, fp16 and bf16 inputs, not {dtype}")


def constant_dim(desc: trtp.TensorDesc, index: int, what: str) -> int:
    expr = desc.shape_expr[index]
    if expr.is_fake or not expr.is_constant:
        raise ValueError(f"TreeAttention needs a build-time constant {what} (dimension {index})")
    return expr.constant_value()


@trtp.register(PLUGIN_ID)
def tree_attention_desc(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc,
                        past_k: trtp.TensorDesc, past_v: trtp.TensorDesc, past_lengths: trtp.TensorDesc,
                        tree_mask: trtp.TensorDesc, scale: float) -> trtp.TensorDesc:
    return q.like()


@trtp.autotune(PLUGIN_ID)
def tree_attention_autotune(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc,
                            past_k: trtp.TensorDesc, past_v: trtp.TensorDesc,
                            past_lengths: trtp.TensorDesc, tree_mask: trtp.TensorDesc,
                            outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
    # '|' ties q, k_new, v_new, past_k, past_v and out to one float type; both int inputs INT32.
    io_types = ", ".join([_FLOAT_TYPES] * 5 + ["INT32", "INT32", _FLOAT_TYPES])
    return [trtp.AutoTuneCombination(io_types, "LINEAR", sorted(TACTICS))]


@trtp.aot_impl(PLUGIN_ID)
def tree_attention_aot(q: trtp.TensorDesc, k_new: trtp.TensorDesc, v_new: trtp.TensorDesc,
                       past_k: trtp.TensorDesc, past_v: trtp.TensorDesc, past_lengths: trtp.TensorDesc,
                       tree_mask: trtp.TensorDesc, scale: float, outputs: tuple[trtp.TensorDesc],
                       tactic: int) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
    head_dim = constant_dim(q, 3, "head dim")
    kernel = fit_shared_memory(kernel_dtype(q.dtype), head_dim, scale, tactic_config(tactic))

    inputs = (q, k_new, v_new, past_k, past_v, past_lengths, tree_mask)
    grid_x, grid_y, grid_z = grid_dims(q.shape_expr[0], q.shape_expr[1], k_new.shape_expr[1],
                                       q.shape_expr[2], kernel.config.block_m, trtp.cdiv)
    params = trtp.KernelLaunchParams()
    params.grid_x = grid_x
    params.grid_y = grid_y
    params.grid_z = grid_z
    params.block_x = kernel.block[0]
    params.block_y = kernel.block[1]
    params.block_z = kernel.block[2]
    params.shared_mem = kernel.shared_mem
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(inputs[i].shape_expr[d]) for _, i, d in KERNEL_SCALARS])
    return kernel.name, kernel.trt_ptx, params, scalars

"""ONNX Runtime's transformer graph optimiser on the exported decoder graphs (`--ort-fusions`).

onnxruntime.transformers' optimizer rewrites subgraphs it knows into ONNX Runtime's contrib kernels.
On treespec's Llama graphs it finds the RMSNorms, alone and after the residual add
(SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization: two per layer). Its attention and
rotary fusions do not match the tree-masked attention, so the tree I/O (tokens, positions, tree mask,
KV inputs and outputs) is what it was. The fused graphs run only on ONNX Runtime: contrib ops are not
ONNX, so TensorRT engines and the TensorRT plugin attention refuse them (checked before exporting).

Measured on this project's CPU machine (2 cores, SmolLM2-135M fp32, one target step against 200
cached tokens, ONNX Runtime CPU; tools/cpu_ort_fusions.py, bench/cpu-ort-fusions.json): 30.7 -> 25.2
ms at 1 token, 41.2 -> 41.4 ms at 16, 87.2 -> 83.5 ms at 64; logits within 5e-3 of the unfused
graph, same argmax. What it saves is per-op overhead: most at small steps.
"""
from __future__ import annotations

from pathlib import Path

from treespec.errors import InputError

FUSED_GRAPHS = ("target", "draft")  # the Llama decoders (the EAGLE head and Medusa keep theirs)


def check_fusable(engines: str, attention: str) -> None:
    if engines != "none":
        raise InputError(f"--ort-fusions writes ONNX Runtime contrib ops, which --engines {engines} cannot build")
    if attention == "plugin":
        raise InputError("--ort-fusions does not apply to --attention plugin (a TensorRT plugin graph)")


def fuse_graph(path: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Rewrite the graph at `path` (and its external data file `<name>.data`) in place; returns the
    fused operators it now holds, by type."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(path), model_type="gpt2", num_heads=num_heads, hidden_size=hidden_size,
                           optimization_options=FusionOptions("gpt2"), opt_level=0)
    fused = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    # The optimiser holds the whole model in memory; onnx appends to an existing data file, so the old
    # files go first and the graph is written once under its own names.
    data = path.with_name(path.name + ".data")
    path.unlink()
    data.unlink()
    onnx.save_model(model.model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name)
    data.chmod(0o644)  # onnx writes it owner-only; the artifacts' other files are world-readable
    return fused

"""Export a TreeDecoder to ONNX with dynamic batch, tree tokens and cache capacity."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from treespec.artifacts import GraphEntry, Profile
from treespec.models.tree_model import TreeDecoder, graph_input_names, graph_output_names

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def example_inputs(decoder: TreeDecoder, dtype: torch.dtype, batch=2, tokens=3, capacity=5):
    """Inputs whose sizes are all > 1, so that torch.export does not specialise any axis."""
    input_ids = torch.randint(0, 100, (batch, tokens), dtype=torch.int64)
    position_ids = torch.arange(tokens, dtype=torch.int64).repeat(batch, 1) + 2
    tree_mask = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool)).repeat(batch, 1, 1)
    past_lengths = torch.tensor([2, 4][:batch] + [1] * max(0, batch - 2), dtype=torch.int64)
    kv_shape = (batch, decoder.num_kv_heads, capacity, decoder.head_dim)
    past = [torch.zeros(kv_shape, dtype=dtype) for _ in range(2 * decoder.num_layers)]
    return (input_ids, position_ids, tree_mask, past_lengths, *past)


def _dynamic_shapes(num_layers: int):
    batch = torch.export.Dim("batch", min=1, max=1024)
    tokens = torch.export.Dim("tree_tokens", min=1, max=8192)
    capacity = torch.export.Dim("past", min=1, max=131072)
    shapes = [{0: batch, 1: tokens}, {0: batch, 1: tokens}, {0: batch, 1: tokens, 2: tokens}, {0: batch}]
    # The cache arrives through *past_kv, which torch.export sees as one tuple argument.
    return (*shapes, tuple({0: batch, 2: capacity} for _ in range(2 * num_layers)))


def _opset_for(attention: str) -> int:
    return 23 if attention == "onnx" else 18


def export_tree_graph(decoder: TreeDecoder, path: Path, precision: str = "fp32") -> Path:
    """Write `path` (plus `path.data` for the weights) and return it."""
    dtype = TORCH_DTYPES[precision]
    decoder = decoder.to(dtype).eval()
    args = example_inputs(decoder, dtype)
    layers = decoder.num_layers
    _quiet_exporter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            decoder,
            args,
            dynamo=True,
            input_names=graph_input_names(layers),
            output_names=graph_output_names(layers),
            dynamic_shapes=_dynamic_shapes(layers),
            opset_version=_opset_for(decoder.attention),
            optimize=True,
            verbose=False,
        )
    _save(program, path)
    return path


def _save(program, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    program.save(str(path), external_data=True)
    # torch names the data file after the model; keep it beside the graph under a known name.
    if not (path.parent / data_name).exists():
        raise RuntimeError(f"expected external data file {data_name} next to {path}")


def _quiet_exporter() -> None:
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def graph_entry(file: str, precision: str, attention: str, max_batch: int, max_tree_tokens: int,
                max_context: int, num_layers: int | None = None) -> GraphEntry:
    """The manifest entry of a decoder graph (target or draft) and the profile its engines get."""
    profile = Profile(batch=(1, 1, max_batch), tree_tokens=(1, min(64, max_tree_tokens), max_tree_tokens),
                      past=(1, min(1024, max_context), max_context))
    return GraphEntry(onnx=file, profile=profile, precision=precision, attention=attention, external_data=True,
                      num_layers=num_layers)

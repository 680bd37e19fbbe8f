"""Put a Medusa or draft-LM drafter into an artifact directory: its ONNX graph + manifest entry."""
from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from treespec.artifacts import DrafterEntry, GraphEntry, Profile
from treespec.exporter.onnx_export import TORCH_DTYPES, _quiet_exporter, _save, export_tree_graph, graph_entry
from treespec.models.drafter_models import MedusaTopK, draft_from_weights, load_weights, medusa_from_weights
from treespec.models.tree_model import TreeDecoder

MEDUSA_TOP_K = 8
DEFAULT_TREES = {
    "medusa": {"policy": "widths", "widths": [4, 8, 8, 8], "budget": 28},
    "draft": {"policy": "widths", "widths": [4, 8, 8, 8, 8], "budget": 36},
}


def export_medusa_graph(heads, path: Path, precision: str, top_k: int = MEDUSA_TOP_K,
                        with_logits: bool = True) -> Path:
    module = MedusaTopK(heads, top_k, with_logits).to(TORCH_DTYPES[precision]).eval()
    hidden = torch.zeros(2, 3, heads.blocks[0].in_features, dtype=TORCH_DTYPES[precision])
    batch = torch.export.Dim("batch", min=1, max=1024)
    tokens = torch.export.Dim("tree_tokens", min=1, max=8192)
    outputs = ["topk_ids", "topk_logprobs"] + (["logits"] if with_logits else [])
    _quiet_exporter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (hidden,), dynamo=True, input_names=["hidden_states"],
                                    output_names=outputs, dynamic_shapes=({0: batch, 1: tokens},),
                                    opset_version=18, optimize=True)
    _save(program, path)
    return path


BUNDLED_WEIGHTS = {"smollm2-135m": Path(__file__).resolve().parent.parent / "weights" / "smollm2"}


def bundled_weights(model: str, kind: str) -> Path | None:
    """The committed trained drafters for the default model (see tools/gpu_train_drafters.sh)."""
    folder = BUNDLED_WEIGHTS.get(model)
    path = folder / f"{kind}.safetensors" if folder else None
    return path if path is not None and path.is_file() else None


@dataclass
class DrafterExport:
    """What a drafter export needs from the export options (plain values: no ExportOptions here)."""

    model: str  # the checkpoint spec as given (its bundled drafter weights are looked up by it)
    precision: str
    attention: str
    max_batch: int
    max_tree_tokens: int
    max_context: int
    weights: Path | None = None  # trained weights given with --drafter-weights


@dataclass
class AddedDrafter:
    entry: DrafterEntry
    graphs: dict[str, GraphEntry]
    default_tree: dict[str, Any]


def export_drafter(kind: str, target, work: Path, req: DrafterExport) -> AddedDrafter:
    """Export the `kind` drafter of `target` into `work`: its graph, its weights and its entry."""
    weights = req.weights or bundled_weights(req.model, kind)
    meta = load_weights(weights)[1] if weights else {}
    if weights:  # keep the weights beside the graph: the torch backend rebuilds the drafter from them
        (work / "drafters").mkdir(exist_ok=True)
        shutil.copyfile(weights, work / "drafters" / f"{kind}.safetensors")
    entry = DrafterEntry(graph=kind, top_k=MEDUSA_TOP_K, weights=f"drafters/{kind}.safetensors" if weights else None,
                         trained=bool(weights),
                         training={k: v for k, v in meta.items() if k not in ("vocab_size", "hidden_size")})
    if kind == "medusa":
        heads = medusa_from_weights(target, weights)
        export_medusa_graph(heads, work / "medusa.onnx", req.precision)
        entry.num_heads = heads.num_heads
        graph = GraphEntry(onnx="medusa.onnx", external_data=True, precision=req.precision, num_heads=heads.num_heads,
                           top_k=MEDUSA_TOP_K, outputs_logits=True,
                           profile=Profile(batch=(1, 1, req.max_batch), tree_tokens=(1, 1, req.max_tree_tokens)))
        return AddedDrafter(entry, {"medusa": graph}, DEFAULT_TREES["medusa"])
    if kind == "draft":
        draft = draft_from_weights(target, weights)
        export_tree_graph(TreeDecoder(draft, req.attention), work / "draft.onnx", req.precision)
        entry.num_layers = draft.config.num_hidden_layers
        graph = graph_entry("draft.onnx", req.precision, req.attention, req.max_batch, req.max_tree_tokens,
                            req.max_context, entry.num_layers)
        return AddedDrafter(entry, {"draft": graph}, DEFAULT_TREES["draft"])
    raise ValueError(kind)

"""Put the EAGLE head into an artifact directory: eagle.onnx, its weights and its manifest entries.

eagle.onnx has the tree graph I/O of target.onnx (input_ids, position_ids, tree_mask,
past_lengths, one layer of fixed-capacity cache; logits and the new K/V rows) plus the target's
features as an input. ONNX names must be unique, so the head's predicted features come out as
`next_hidden_states` (the input is `hidden_states`, as in the head's forward). The runtime runs it
with the target's cache contract: runtime/drafters/eagle.py (OrtEagleHead).

A head with a draft vocabulary (treespec.models.draft_vocab) exports logits over its K ids only.
The ids travel in the shipped weights (drafters/eagle.safetensors, tensor `draft_vocab`), the one
place they live, and the drafter entry's `draft_vocab` says K: the loader reads them from there
and checks the graph's logits width against it.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

from treespec.artifacts import DrafterEntry
from treespec.exporter.drafter_export import AddedDrafter, DrafterExport, bundled_weights
from treespec.exporter.onnx_export import TORCH_DTYPES, _quiet_exporter, _save, graph_entry
from treespec.models.drafter_models import load_weights
from treespec.models.eagle import EAGLE_KIND, EagleHead, eagle_from_weights, eagle_metadata, save_eagle

EAGLE_TOP_K = 16  # candidates per node the drafter offers (eagle2 trees take their own top_k of them)
INPUT_NAMES = ["hidden_states", "input_ids", "position_ids", "tree_mask", "past_lengths", "past_key_0",
               "past_value_0"]
OUTPUT_NAMES = ["logits", "next_hidden_states", "new_key_0", "new_value_0"]
# configs/trees/eagle2-d5-k6-n32: on CUDA the fastest EAGLE tree measured (H100, 2026-12-07: 1,749 tok/s
# against 1,306 for eagle2-d6-k8-n64, which accepts more per step but verifies 64 rows, past the 32 rows
# where the torch backend's Triton step is the cheaper; bench/h100-2026-12-07-2200/). The CPU plans its own.
DEFAULT_TREE = {"policy": "eagle2", "depth": 5, "top_k": 6, "budget": 31}


def example_inputs(head: EagleHead, dtype: torch.dtype, batch: int = 2, tokens: int = 3, capacity: int = 5):
    """Inputs whose sizes are all > 1, so that torch.export does not specialise any axis."""
    core = head.core
    hidden = torch.randn(batch, tokens, head.hidden_size, dtype=dtype)
    input_ids = torch.randint(0, 100, (batch, tokens), dtype=torch.int64)
    position_ids = torch.arange(tokens, dtype=torch.int64).repeat(batch, 1) + 2
    tree_mask = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool)).repeat(batch, 1, 1)
    past_lengths = torch.tensor([2, 4][:batch] + [1] * max(0, batch - 2), dtype=torch.int64)
    kv_shape = (batch, core.num_kv_heads, capacity, core.head_dim)
    return (hidden, input_ids, position_ids, tree_mask, past_lengths,
            torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype))


def export_eagle_graph(head: EagleHead, path: Path, precision: str = "fp32") -> Path:
    """Write `path` (plus `path.data` for the weights) and return it."""
    dtype = TORCH_DTYPES[precision]
    head = head.to(dtype).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    tokens = torch.export.Dim("tree_tokens", min=1, max=8192)
    capacity = torch.export.Dim("past", min=1, max=131072)
    rows = {0: batch, 1: tokens}
    shapes = (rows, rows, rows, {0: batch, 1: tokens, 2: tokens}, {0: batch}, {0: batch, 2: capacity},
              {0: batch, 2: capacity})
    _quiet_exporter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(head, example_inputs(head, dtype), dynamo=True, input_names=INPUT_NAMES,
                                    output_names=OUTPUT_NAMES, dynamic_shapes=shapes,
                                    opset_version=23 if head.core.attention == "onnx" else 18, optimize=True,
                                    verbose=False)
    _save(program, path)
    return path


def export_eagle(target, work: Path, req: DrafterExport) -> AddedDrafter:
    """The EAGLE head of `target` into `work`: eagle.onnx, drafters/eagle.safetensors (for the
    torch backend) when trained weights are given or bundled, and its entries."""
    weights = req.weights or bundled_weights(req.model, EAGLE_KIND)
    meta = load_weights(weights)[1] if weights else {}
    saved = work / "drafters" / f"{EAGLE_KIND}.safetensors"
    saved.parent.mkdir(exist_ok=True)
    if weights:
        shutil.copyfile(weights, saved)
    else:  # an untrained head starts from random numbers: ship them, so torch runs the same head
        save_eagle(eagle_from_weights(target, None), saved, eagle_metadata(target.config, {"trained": "0"}))
    head = eagle_from_weights(target, saved, req.attention)  # the graph gets exactly the shipped (fp16) weights
    export_eagle_graph(head, work / "eagle.onnx", req.precision)
    vocab = None if head.draft_vocab is None else len(head.draft_vocab)
    entry = DrafterEntry(graph=EAGLE_KIND, top_k=EAGLE_TOP_K, num_layers=1, weights=f"drafters/{saved.name}",
                         draft_vocab=vocab, trained=bool(weights),
                         training={k: v for k, v in meta.items() if k not in ("vocab_size", "hidden_size")})
    graph = graph_entry("eagle.onnx", req.precision, req.attention, req.max_batch, req.max_tree_tokens,
                        req.max_context, 1)
    return AddedDrafter(entry, {EAGLE_KIND: graph}, dict(DEFAULT_TREE))

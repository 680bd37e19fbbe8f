"""treespec-export's steps: checkpoint -> ONNX graphs (+ drafters, engines, Triton repo) -> manifest.

The artifact directory is assembled in a temporary sibling and moved into place at the end, so
a failed export leaves whatever the user had untouched.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file

from treespec import __version__
from treespec.artifacts import (DrafterEntry, Manifest, ModelDims, ModelSection, TokenizerEntry, TorchWeights,
                                write_manifest)
from treespec.errors import InputError
from treespec.files import write_json
from treespec.exporter.drafter_export import AddedDrafter, DrafterExport, export_drafter
from treespec.exporter.eagle_export import export_eagle
from treespec.exporter.engines import build_engines
from treespec.exporter.ort_fusions import FUSED_GRAPHS, check_fusable, fuse_graph
from treespec.exporter.output_dir import check_output_dir
from treespec.exporter.onnx_export import TORCH_DTYPES, export_tree_graph, graph_entry
from treespec.exporter.triton_repo import write_triton_repo
from treespec.models.drafter_models import check_compatible, load_weights
from treespec.models.checkpoint import load_checkpoint
from treespec.models.tree_model import TreeDecoder

DRAFTERS = ("lookup", "medusa", "draft", "eagle")


@dataclass
class ExportOptions:
    model: str
    out: Path
    attention: str = "decomposed"
    precision: str = "fp32"
    drafters: list[str] = field(default_factory=lambda: ["lookup"])
    drafter_weights: dict[str, Path] = field(default_factory=dict)
    engines: str = "none"
    compute_capabilities: list[str] | None = None
    triton_repo: Path | None = None
    max_context: int | None = None
    max_batch: int = 8
    max_tree_tokens: int = 128
    ort_fusions: bool = False  # ONNX Runtime's transformer fusions on the decoder graphs (exporter/ort_fusions.py)
    force: bool = False


def model_section(model, name: str, source: str, max_context: int | None) -> ModelSection:
    cfg = model.config
    heads = cfg.num_attention_heads
    limit = int(getattr(cfg, "max_position_embeddings", 2048))
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    dims = ModelDims(num_layers=cfg.num_hidden_layers, num_heads=heads, num_kv_heads=cfg.num_key_value_heads,
                     head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                     hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                     max_context=min(max_context or limit, limit))
    return ModelSection(dims, name=name, source=source, architecture=cfg.model_type,
                        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
                        eos_token_ids=[int(e) for e in eos if e is not None], bos_token_id=cfg.bos_token_id)


TORCH_WEIGHTS_DIR = "torch"


def save_torch_weights(model, work: Path, precision: str) -> TorchWeights:
    """The target as an HF safetensors folder in the artifacts (config.json + model.safetensors):
    what the torch backend loads. Written directly, since transformers refuses to save_pretrained
    a model it loaded from GGUF; a tensor tied to an earlier one (lm_head to the embeddings) is
    stored once and re-tied on load by the config's tie_word_embeddings."""
    folder = work / TORCH_WEIGHTS_DIR
    folder.mkdir()
    dtype = TORCH_DTYPES[precision]
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().to(dtype).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights here are plain tensors, not the GGUF's
    config.pop("_name_or_path", None)  # where the source was: provenance the artifacts do not need
    write_json(folder / "config.json", config)
    return TorchWeights(TORCH_WEIGHTS_DIR, precision)


def run_export(opts: ExportOptions, progress: Callable[[str], None] = print) -> Manifest:
    check_output_dir(opts.out, opts.force)
    if opts.ort_fusions:
        check_fusable(opts.engines, opts.attention)
    for kind in opts.drafters:
        if kind not in DRAFTERS:
            raise InputError(f"unknown drafter '{kind}' (choose from {', '.join(DRAFTERS)})")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.tmp-", dir=opts.out.parent))
    work.chmod(0o755)
    try:
        manifest = _export_into(opts, work, progress)
        if opts.engines != "none":
            t = time.perf_counter()
            progress(f"building {opts.engines} engines")
            raw = manifest.to_dict()
            build_engines(work, raw, opts.engines, opts.precision, opts.compute_capabilities, progress)
            manifest = Manifest.from_dict(raw, work)
            manifest.export["timings_s"]["engines_s"] = round(time.perf_counter() - t, 2)
            write_manifest(work, manifest)
        _move_into_place(work, opts.out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    manifest.root = opts.out
    if opts.triton_repo is not None:
        progress(f"writing the Triton model repository to {opts.triton_repo}")
        write_triton_repo(opts.out, opts.triton_repo, force=opts.force)
    return manifest


def _export_into(opts: ExportOptions, work: Path, progress: Callable[[str], None]) -> Manifest:
    """Graphs, drafters, tokenizer and torch weights into `work`; the manifest written there."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    progress(f"loading {opts.model}")
    ckpt = load_checkpoint(opts.model)
    _check_drafter_weights(opts, ckpt)
    model = model_section(ckpt.model, ckpt.name, ckpt.source, opts.max_context)
    ckpt.tokenizer.save_pretrained(str(work / "tokenizer"))
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    progress(f"exporting target.onnx ({opts.attention} attention, {opts.precision})")
    export_tree_graph(TreeDecoder(ckpt.model, opts.attention), work / "target.onnx", opts.precision)
    torch_weights = save_torch_weights(ckpt.model, work, opts.precision)
    timings["target_export_s"] = time.perf_counter() - t
    graphs = {"target": graph_entry("target.onnx", opts.precision, opts.attention, opts.max_batch,
                                    opts.max_tree_tokens, model.dims.max_context)}
    drafters: dict[str, DrafterEntry] = {}
    default_trees: dict[str, dict] = {"none": {"policy": "none"}}
    for kind in opts.drafters:
        t = time.perf_counter()
        progress(f"adding the {kind} drafter")
        added = add_drafter(kind, ckpt, opts, work, model.dims.max_context)
        drafters[kind] = added.entry
        graphs.update(added.graphs)
        default_trees[kind] = added.default_tree
        timings[f"{kind}_s"] = time.perf_counter() - t

    export: dict = {}
    if opts.ort_fusions:
        t = time.perf_counter()
        progress("fusing the decoder graphs for ONNX Runtime")
        export["ort_fusions"] = {name: fuse_graph(work / graphs[name].onnx, model.dims.num_heads,
                                                  model.dims.hidden_size) for name in FUSED_GRAPHS if name in graphs}
        timings["ort_fusions_s"] = time.perf_counter() - t
    manifest = Manifest(
        model=model, treespec_version=__version__,
        tokenizer=TokenizerEntry("tokenizer", bool(getattr(ckpt.tokenizer, "chat_template", None))),
        graphs=graphs, drafters=drafters, default_drafter=opts.drafters[0] if opts.drafters else "none",
        default_trees=default_trees, torch_weights=torch_weights,
        export={"timings_s": {k: round(v, 2) for k, v in timings.items()}, "sizes_bytes": _sizes(work), **export},
        root=work)
    write_manifest(work, manifest)
    return manifest


def _check_drafter_weights(opts: ExportOptions, ckpt) -> None:
    """Refuse drafter weights made for another model before spending time on the export."""
    if not opts.drafter_weights:
        return
    for kind, path in opts.drafter_weights.items():
        if kind in opts.drafters:
            check_compatible(load_weights(path)[1], ckpt.model.config, path)


def add_drafter(kind: str, ckpt, opts: ExportOptions, work: Path, max_context: int) -> AddedDrafter:
    """The manifest entry, extra graphs and default tree of one drafter."""
    if kind == "lookup":
        return AddedDrafter(DrafterEntry(options={"max_ngram": 3, "top_k": 4}), {},
                            {"policy": "opt", "budget": 24, "delta": 0.05, "max_depth": 8})
    req = DrafterExport(model=opts.model, precision=opts.precision, attention=opts.attention, max_batch=opts.max_batch,
                        max_tree_tokens=opts.max_tree_tokens, max_context=max_context,
                        weights=opts.drafter_weights.get(kind))
    if kind == "eagle":
        return export_eagle(ckpt.model, work, req)
    return export_drafter(kind, ckpt.model, work, req)


def _move_into_place(work: Path, out: Path) -> None:
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(backup)
        work.rename(out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        work.rename(out)


def _sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}

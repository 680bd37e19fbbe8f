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

from treespec.errors import InputError
from treespec.artifacts import KV_CACHE_CONTRACT, write_manifest
from treespec.exporter.output_dir import check_output_dir

DRAFTERS = ("lookup", "medusa", "draft")


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
    force: bool = False


def model_section(model, name: str, source: str, max_context: int | None) -> dict:
    cfg = model.config
    heads = cfg.num_attention_heads
    limit = int(getattr(cfg, "max_position_embeddings", 2048))
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    return {
        "name": name,
        "source": source,
        "checkpoint": None,  # filled by run_export: what treespec-export was given
        "architecture": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_context": min(max_context or limit, limit),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "eos_token_ids": [int(e) for e in eos if e is not None],
        "bos_token_id": cfg.bos_token_id,
    }


def graph_entry(file: str, opts: ExportOptions, max_context: int, **extra) -> dict:
    return {
        "onnx": file,
        "external_data": True,
        "precision": opts.precision,
        "attention": opts.attention,
        "profile": {
            "batch": [1, 1, opts.max_batch],
            "tree_tokens": [1, min(64, opts.max_tree_tokens), opts.max_tree_tokens],
            "past": [1, min(1024, max_context), max_context],
        },
        "engines": [],
        **extra,
    }


def run_export(opts: ExportOptions, progress: Callable[[str], None] = print) -> dict:
    from treespec.models.checkpoint import load_checkpoint
    from treespec.exporter.onnx_export import export_tree_graph
    from treespec.models.tree_model import TreeDecoder

    check_output_dir(opts.out, opts.force)
    for kind in opts.drafters:
        if kind not in DRAFTERS:
            raise InputError(f"unknown drafter '{kind}' (choose from {', '.join(DRAFTERS)})")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.tmp-", dir=opts.out.parent))
    work.chmod(0o755)
    timings: dict[str, float] = {}
    try:
        t = time.perf_counter()
        progress(f"loading {opts.model}")
        ckpt = load_checkpoint(opts.model)
        _check_drafter_weights(opts, ckpt)
        model = model_section(ckpt.model, ckpt.name, ckpt.source, opts.max_context)
        model["checkpoint"] = opts.model if opts.model in ("smollm2-135m", "tiny-random") else str(
            Path(opts.model).resolve())
        ckpt.tokenizer.save_pretrained(str(work / "tokenizer"))
        timings["load_s"] = time.perf_counter() - t

        t = time.perf_counter()
        progress(f"exporting target.onnx ({opts.attention} attention, {opts.precision})")
        export_tree_graph(TreeDecoder(ckpt.model, opts.attention), work / "target.onnx", opts.precision)
        timings["target_export_s"] = time.perf_counter() - t
        graphs = {"target": graph_entry("target.onnx", opts, model["max_context"])}

        drafters: dict[str, dict] = {}
        default_trees: dict[str, dict] = {"none": {"policy": "none"}}
        for kind in opts.drafters:
            t = time.perf_counter()
            progress(f"adding the {kind} drafter")
            spec, extra_graphs, tree = add_drafter(kind, ckpt, opts, work, model)
            drafters[kind] = spec
            graphs.update(extra_graphs)
            default_trees[kind] = tree
            timings[f"{kind}_s"] = time.perf_counter() - t

        manifest = {
            "treespec_version": _version(),
            "model": model,
            "tokenizer": {"path": "tokenizer", "chat_template": bool(getattr(ckpt.tokenizer, "chat_template", None))},
            "kv_cache": KV_CACHE_CONTRACT,
            "graphs": graphs,
            "drafters": drafters,
            "default_drafter": opts.drafters[0] if opts.drafters else "none",
            "default_trees": default_trees,
            "export": {"timings_s": {k: round(v, 2) for k, v in timings.items()},
                       "sizes_bytes": _sizes(work)},
        }
        write_manifest(work, manifest)
        if opts.engines != "none":
            t = time.perf_counter()
            progress(f"building {opts.engines} engines")
            from treespec.exporter.engines import build_engines

            build_engines(work, manifest, opts.engines, opts.precision, opts.compute_capabilities, progress)
            manifest["export"]["timings_s"]["engines_s"] = round(time.perf_counter() - t, 2)
            write_manifest(work, manifest)
        _move_into_place(work, opts.out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if opts.triton_repo is not None:
        progress(f"writing the Triton model repository to {opts.triton_repo}")
        from treespec.exporter.triton_repo import write_triton_repo

        write_triton_repo(opts.out, opts.triton_repo, force=opts.force)
    return manifest


def _check_drafter_weights(opts: ExportOptions, ckpt) -> None:
    """Refuse drafter weights made for another model before spending time on the export."""
    if not opts.drafter_weights:
        return
    from treespec.models.drafter_models import check_compatible, load_weights

    for kind, path in opts.drafter_weights.items():
        if kind in opts.drafters:
            check_compatible(load_weights(path)[1], ckpt.model.config, path)


def add_drafter(kind: str, ckpt, opts: ExportOptions, work: Path, model: dict):
    """(manifest drafter entry, extra graph entries, default tree config) for one drafter."""
    if kind == "lookup":
        return {"options": {"max_ngram": 3, "top_k": 4}}, {}, {"policy": "opt", "budget": 24, "delta": 0.05,
                                                               "max_depth": 8}
    from treespec.exporter.drafter_export import export_drafter

    return export_drafter(kind, ckpt, opts, work, model)


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


def _version() -> str:
    from treespec import __version__

    return __version__

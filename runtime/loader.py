"""The one loader: manifest entries in, built backends and drafters out (Polygraphy's split).

Backends (runtime/backends/) and drafters (runtime/drafters/) only run what they are given: an
ONNX Runtime session, a TensorRT engine file with its record, an HF model, Medusa heads, a draft
backend. Everything that reads the manifest and opens files lives here, one small loader per
backend and per drafter kind, in the two name -> loader tables below. A new drafter is one
function and one entry in DRAFTER_LOADERS.

Every loader reads only the artifact directory: the torch backend's weights come from the
manifest's `torch_weights` folder, never from the checkpoint the artifacts were exported from.
"""
from __future__ import annotations

import copy
import warnings
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from treespec.artifacts import DrafterEntry, Manifest
from treespec.errors import ArtifactError, BackendError
from treespec.models.draft_vocab import DraftVocab, read_draft_vocab
from treespec.models.drafter_models import draft_from_weights, medusa_from_weights
from treespec.models.eagle import eagle_from_weights
from treespec.runtime.backends.base import TreeBackend
from treespec.runtime.backends.onnxruntime import CudaGraphsUnavailable, OnnxRuntimeBackend, open_session
from treespec.runtime.backends.onnxruntime_device import OnnxRuntimeDeviceBackend
from treespec.runtime.backends.tensorrt import TensorRTBackend
from treespec.runtime.backends.torch_backend import TorchBackend
from treespec.runtime.drafters.base import Drafter
from treespec.runtime.drafters.draft_lm import DraftModelDrafter
from treespec.runtime.drafters.eagle import EAGLE_TOP_K, EagleDrafter, OrtEagleHead
from treespec.runtime.drafters.eagle_torch import TorchEagleDrafter, TorchEagleHead
from treespec.runtime.drafters.int8_graph import Int8Graph, int8_wanted
from treespec.runtime.drafters.lookup import LookupDrafter
from treespec.runtime.drafters.medusa import MedusaDrafter, TorchMedusaDrafter

_HF_MODELS: dict[tuple[str, str], torch.nn.Module] = {}  # (weights folder, device) -> HF model
_HF_DRAFTS: dict[tuple[str, str, str], torch.nn.Module] = {}


def load_tokenizer(manifest: Manifest):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(manifest.tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load the tokenizer from {manifest.tokenizer_dir}: {exc}") from None


# -- backends --------------------------------------------------------------------------------------

def _open_graph_session(manifest: Manifest, name: str, device: str, threads: int | None, cuda_graphs: bool = False,
                        logits_width: int | None = None):
    """An ONNX Runtime session of the graph `name`; a drafter's fp32 graph on the CPU runs a copy with
    int8 MatMul weights (runtime/drafters/int8_graph.py), which the session holds on to."""
    entry = manifest.graph(name)
    path = manifest.require_file(entry.onnx)
    if entry.external_data:
        manifest.require_file(entry.onnx + ".data")
    quantized = Int8Graph.of(path) if int8_wanted(name, device, entry.precision) else None
    # A drafter's session runs between two target steps: if its threads spun on after its run, they
    # would hold the cores the target's step needs (2 CPU cores, the demo: EAGLE 0.76x -> 1.02x plain
    # decoding, Medusa 0.91x -> 1.01x). The target keeps spinning: without it plain decoding lost 20%.
    session = open_session(quantized.path if quantized else path, device, threads, cuda_graphs=cuda_graphs,
                           spinning=name == "target")
    check_graph_dims(manifest, name, session, logits_width)
    session.treespec_int8 = quantized  # the copy's folder lives as long as the session
    return session


def _load_onnxruntime(manifest: Manifest, name: str, device: str, threads: int | None) -> TreeBackend:
    """Host numpy buffers (CPU); on CUDA the device-buffer backend, as the CLI's `onnxruntime` means."""
    if device == "cuda":
        return _load_onnxruntime_device(manifest, name, device, threads)
    dims = manifest.graph_dims(name)
    session = _open_graph_session(manifest, name, device, threads)
    return OnnxRuntimeBackend(session, dims.num_layers, dims.num_kv_heads, dims.head_dim,
                              manifest.graph(name).precision, device)


def _load_onnxruntime_device(manifest: Manifest, name: str, device: str, threads: int | None) -> TreeBackend:
    """Device-resident cache and outputs through IO binding to torch tensors (CUDA, or the CPU in CI)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError("onnxruntime backend: CUDA is not available on this machine (use --device cpu)")
    graphs = device == "cuda"
    try:
        session = _open_graph_session(manifest, name, device, threads, cuda_graphs=graphs)
    except CudaGraphsUnavailable as exc:
        warnings.warn(f"onnxruntime: CUDA graphs unavailable for {manifest.graph(name).onnx} ({exc}); running without")
        graphs, session = False, _open_graph_session(manifest, name, device, threads)
    if device == "cuda" and name == "target" and manifest.graph(name).precision == "fp16":
        warnings.warn("onnxruntime on CUDA with an fp16 target: ONNX Runtime's attention sums "
                      "round differently for tree and plain steps, so outputs can differ from "
                      "--tree none at near-tie tokens (H100: 7-9 of 10 prompts identical over 256 "
                      "tokens); export --precision fp32 for lossless output, or use --backend torch")
    dims = manifest.graph_dims(name)
    target = name == "target"
    return OnnxRuntimeDeviceBackend(session, dims.num_layers, dims.num_kv_heads, dims.head_dim, device, graphs,
                                    min_bucket=None if target else 1, host_argmax=target)


def _load_tensorrt(manifest: Manifest, name: str, device: str, threads: int | None, builder: str) -> TreeBackend:
    record = manifest.graph(name).engine(builder)
    if record is None:
        have = ", ".join(f"{r.builder} {r.builder_version}" for r in manifest.graph(name).engines) or "none"
        raise ArtifactError(f"graph '{name}' has no {builder} engine (it has: {have}): export with "
                            f"treespec-export ... --engines {builder}")
    cache = manifest.resolve(record.runtime_cache) if record.runtime_cache else None
    return TensorRTBackend(manifest.resolve(record.file), record.to_dict(), device=device if device != "cpu" else "cuda",
                           runtime_cache=cache)


def _load_torch(manifest: Manifest, name: str, device: str, threads: int | None) -> TreeBackend:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError("torch backend: CUDA is not available on this machine (use --device cpu)")
    if name == "target":
        return TorchBackend(load_hf_model(manifest, device), device)
    if name == "draft":  # the draft needs no bit-identity across T, and ranks with topk_logprobs
        return TorchBackend(load_hf_draft(manifest, device), device, min_bucket=1, host_argmax=False)
    raise BackendError(f"torch backend: no graph named '{name}'")


BACKEND_LOADERS: dict[str, Callable[[Manifest, str, str, int | None], TreeBackend]] = {
    "onnxruntime": _load_onnxruntime,
    "onnxruntime-device": _load_onnxruntime_device,
    "tensorrt": partial(_load_tensorrt, builder="tensorrt"),
    "tensorrt-rtx": partial(_load_tensorrt, builder="tensorrt-rtx"),
    "torch": _load_torch,
}
BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx", "torch")  # what users choose; -device is internal


def load_graph(manifest: Manifest, name: str, backend: str, device: str, threads: int | None = None) -> TreeBackend:
    """A TreeBackend for the `target` or `draft` graph."""
    loader = BACKEND_LOADERS.get(backend)
    if loader is None:
        raise BackendError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    return loader(manifest, name, device, threads)


def load_target(manifest: Manifest, backend: str, device: str, threads: int | None = None) -> TreeBackend:
    return load_graph(manifest, "target", backend, device, threads)


def check_graph_dims(manifest: Manifest, name: str, session, logits_width: int | None = None) -> None:
    """Refuse a graph whose vocabulary, hidden size or layer count differs from the manifest's (e.g.
    a drafter exported for another model): drafted token ids must be the target's token ids.
    `logits_width`: the graph's logits are over a draft vocabulary of that many target ids."""
    dims = manifest.graph_dims(name) if name in ("target", "draft") else manifest.dims
    wanted = {"logits": ("vocabulary", logits_width or dims.vocab_size)}
    if name in ("target", "medusa", "eagle"):  # Medusa and EAGLE heads read the target's hidden states
        wanted["hidden_states"] = ("hidden size", dims.hidden_size)
    for arg in list(session.get_inputs()) + list(session.get_outputs()):
        if arg.name not in wanted or not arg.shape:
            continue
        what, want = wanted[arg.name]
        got = arg.shape[-1]
        if isinstance(got, int) and got != want:
            raise ArtifactError(
                f"{manifest.root}: the '{name}' graph has a {what} of {got} ({arg.name}) but the target "
                f"model's is {want}: it was exported for another model; re-export the artifacts with "
                "treespec-export")
    layers = sum(1 for arg in session.get_inputs() if arg.name.startswith("past_key_"))
    if name in ("target", "draft") and layers != dims.num_layers:
        raise ArtifactError(f"{manifest.root}: the '{name}' graph has {layers} layers of KV cache but the manifest "
                            f"says {dims.num_layers}: re-export the artifacts with treespec-export")


# -- the torch models: from the artifacts' own weights -------------------------------------------

def load_hf_model(manifest: Manifest, device: str) -> torch.nn.Module:
    """The target as an HF model from `torch_weights` (once per process), fp16 on CUDA, fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    folder = _torch_weights_dir(manifest)
    key = (str(folder), device)
    if key not in _HF_MODELS:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True,
                                                         local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(f"cannot load the torch weights from {folder}: {exc}") from None
        _HF_MODELS[key] = model.to(device).eval()
    return _HF_MODELS[key]


def _torch_weights_dir(manifest: Manifest) -> Path:
    if manifest.torch_weights is None:
        raise ArtifactError(f"{manifest.root}: the manifest names no torch_weights: re-export the artifacts "
                            "with treespec-export")
    return manifest.require_file(manifest.torch_weights.path)


def _drafter_weights(manifest: Manifest, spec: DrafterEntry) -> Path | None:
    return manifest.require_file(spec.weights) if spec.weights else None


def load_hf_draft(manifest: Manifest, device: str) -> torch.nn.Module:
    """The draft LM in HF form: the target's embeddings, norm and lm_head with its own layers."""
    spec = manifest.drafter("draft")
    path = _drafter_weights(manifest, spec)
    target = load_hf_model(manifest, device)
    key = (str(_torch_weights_dir(manifest)), str(path), device)
    if key not in _HF_DRAFTS:
        layers = manifest.graph("draft").num_layers or spec.num_layers
        draft = draft_from_weights(target, path, layers)
        if target.generation_config is not None:  # HF assisted generation edits it
            draft.generation_config = copy.deepcopy(target.generation_config)
        draft.model.layers.to(device=device, dtype=target.dtype)  # its own; the rest is the target's
        _HF_DRAFTS[key] = draft.eval()
    return _HF_DRAFTS[key]


# -- drafters --------------------------------------------------------------------------------------

def _load_lookup(manifest: Manifest, spec: DrafterEntry, backend: str, device: str, threads: int | None) -> Drafter:
    return LookupDrafter(**spec.options)


def _load_medusa(manifest: Manifest, spec: DrafterEntry, backend: str, device: str, threads: int | None) -> Drafter:
    graph = manifest.graph(spec.graph or "medusa")
    num_heads, top_k = int(graph.num_heads or spec.num_heads or 4), int(graph.top_k or spec.top_k or 8)
    if backend == "torch":  # the heads on the target's device, from the artifacts' weights
        target = load_hf_model(manifest, device)
        heads = medusa_from_weights(target, _drafter_weights(manifest, spec), num_heads)
        heads.blocks.to(device=target.lm_head.weight.device, dtype=target.lm_head.weight.dtype)
        return TorchMedusaDrafter(heads.eval(), top_k, manifest.dims.hidden_size, device)
    if backend not in ("onnxruntime", "onnxruntime-device"):
        raise ArtifactError(f"the Medusa drafter runs on onnxruntime here, not {backend}")
    session = _open_graph_session(manifest, spec.graph or "medusa", device, threads)
    dtype = np.float16 if graph.precision == "fp16" else np.float32
    return MedusaDrafter(session, num_heads, top_k, manifest.dims.hidden_size, dtype)


def _load_draft(manifest: Manifest, spec: DrafterEntry, backend: str, device: str, threads: int | None) -> Drafter:
    return DraftModelDrafter(load_graph(manifest, spec.graph or "draft", backend, device, threads), spec.top_k or 8)


def _load_eagle(manifest: Manifest, spec: DrafterEntry, backend: str, device: str, threads: int | None) -> Drafter:
    dims, top_k = manifest.dims, spec.top_k or EAGLE_TOP_K
    if backend == "torch":  # the head on the target's device; eagle2 trees drafted in one CUDA graph
        target = load_hf_model(manifest, device)
        head = eagle_from_weights(target, _drafter_weights(manifest, spec)).place(device, target.dtype)
        runner = TorchEagleHead(head.eval(), dims.num_kv_heads, dims.head_dim, device)
        return TorchEagleDrafter(runner, dims.hidden_size, top_k)
    if backend not in ("onnxruntime", "onnxruntime-device"):
        raise ArtifactError(f"the EAGLE drafter runs on onnxruntime or torch here, not {backend}")
    graph, vocab = spec.graph or "eagle", _eagle_vocab(manifest, spec)
    session = _open_graph_session(manifest, graph, device, threads, logits_width=vocab and len(vocab))
    head = OrtEagleHead(session, 1, dims.num_kv_heads, dims.head_dim, manifest.graph(graph).precision, device)
    return EagleDrafter(head, dims.hidden_size, top_k, vocab)


def _eagle_vocab(manifest: Manifest, spec: DrafterEntry) -> DraftVocab | None:
    """The draft vocabulary eagle.onnx's logits are over: the `draft_vocab` ids of the head's
    shipped weights, as many as the entry says (None: the full vocabulary)."""
    if spec.draft_vocab is None:
        return None
    path = _drafter_weights(manifest, spec)
    ids = read_draft_vocab(path, manifest.dims.vocab_size) if path is not None else None
    if ids is None or len(ids) != spec.draft_vocab:
        raise ArtifactError(f"{manifest.root}: the eagle drafter entry says a draft vocabulary of {spec.draft_vocab} "
                            f"ids but its weights ({spec.weights}) hold {'none' if ids is None else len(ids)}: "
                            "re-export the artifacts with treespec-export")
    return DraftVocab.of(ids, manifest.dims.vocab_size)


DRAFTER_LOADERS: dict[str, Callable[[Manifest, DrafterEntry, str, str, int | None], Drafter]] = {
    "lookup": _load_lookup,
    "medusa": _load_medusa,
    "draft": _load_draft,
    "eagle": _load_eagle,
}


def load_drafter(manifest: Manifest, backend: str, device: str, threads: int | None = None,
                 kind: str | None = None) -> Drafter | None:
    kind = kind or manifest.default_drafter_kind
    if kind == "none":
        return None
    spec = manifest.drafter(kind)
    loader = DRAFTER_LOADERS.get(kind)
    if loader is None:
        raise ArtifactError(f"manifest names an unknown drafter kind '{kind}' (this treespec knows: "
                            f"{', '.join(DRAFTER_LOADERS)})")
    return loader(manifest, spec, backend, device, threads)

"""Build the runtime's parts (tokenizer, target backend, drafter) from a manifest."""
from __future__ import annotations

from treespec.errors import BackendError

from treespec.runtime.backends.base import TreeBackend
from treespec.runtime.drafters.base import Drafter
from treespec.errors import ArtifactError
from treespec.artifacts import Manifest

BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx", "torch")


def load_tokenizer(manifest: Manifest):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(manifest.tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load the tokenizer from {manifest.tokenizer_dir}: {exc}") from None


def load_graph(manifest: Manifest, name: str, backend: str, device: str,
               threads: int | None = None) -> TreeBackend:
    """A TreeBackend for the `target` or `draft` graph."""
    entry = manifest.graph(name)
    dims = manifest.dims if name == "target" else _draft_dims(manifest)
    if backend == "onnxruntime":
        from treespec.runtime.backends.onnxruntime import OnnxRuntimeBackend

        path = manifest.require_file(entry["onnx"])
        manifest.require_file(entry["onnx"] + ".data") if entry.get("external_data") else None
        if device == "cuda":  # device-resident cache and outputs (IO binding to torch tensors)
            from treespec.runtime.backends.onnxruntime_device import OnnxRuntimeDeviceBackend

            device_backend = OnnxRuntimeDeviceBackend(path, dims.num_layers, dims.num_kv_heads, dims.head_dim,
                                                      device, threads, min_bucket=None if name == "target" else 1,
                                                      host_argmax=name == "target")
            check_graph_dims(manifest, name, device_backend.session)
            if name == "target" and entry.get("precision") == "fp16":
                import warnings

                warnings.warn("onnxruntime on CUDA with an fp16 target: ONNX Runtime's attention sums "
                              "round differently for tree and plain steps, so outputs can differ from "
                              "--tree none at near-tie tokens (H100: 7-9 of 10 prompts identical over 256 "
                              "tokens); export --precision fp32 for lossless output, or use --backend torch")
            return device_backend
        ort_backend = OnnxRuntimeBackend(path, dims.num_layers, dims.num_kv_heads, dims.head_dim,
                                         entry.get("precision", "fp32"), device, threads)
        check_graph_dims(manifest, name, ort_backend.session)
        return ort_backend
    if backend in ("tensorrt", "tensorrt-rtx"):
        from treespec.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend.from_manifest(manifest, name, backend)
    if backend == "torch":
        from treespec.runtime.backends.torch_backend import TorchBackend

        return TorchBackend.from_manifest(manifest, name, device)
    raise BackendError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")


def check_graph_dims(manifest: Manifest, name: str, session) -> None:
    """Refuse a graph whose vocabulary or hidden size differs from the target's (e.g. a drafter
    exported for another model): drafted token ids must be the target's token ids."""
    dims = manifest.dims
    wanted = {"logits": ("vocabulary", dims.vocab_size)}
    if name in ("target", "medusa"):  # Medusa heads read the target's hidden states
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


def _draft_dims(manifest: Manifest):
    from treespec.artifacts import ModelDims

    return ModelDims.from_dict({**manifest.model, **manifest.graph("draft").get("dims", {})})


def load_target(manifest: Manifest, backend: str, device: str, threads: int | None = None) -> TreeBackend:
    return load_graph(manifest, "target", backend, device, threads)


def load_drafter(manifest: Manifest, backend: str, device: str, threads: int | None = None,
                 kind: str | None = None) -> Drafter | None:
    kind = kind or manifest.default_drafter
    if kind == "none":
        return None
    spec = manifest.drafters.get(kind)
    if spec is None:
        raise ArtifactError(f"these artifacts have no '{kind}' drafter (they have: "
                            f"{', '.join(manifest.drafters) or 'none'}; add one with treespec-export --drafter)")
    if kind == "lookup":
        from treespec.runtime.drafters.lookup import LookupDrafter

        return LookupDrafter(**spec.get("options", {}))
    if kind == "medusa":
        from treespec.runtime.drafters.medusa import MedusaDrafter

        drafter = MedusaDrafter.from_manifest(manifest, backend, device, threads)
        check_graph_dims(manifest, "medusa", drafter.session)
        return drafter
    if kind == "draft":
        from treespec.runtime.drafters.draft_lm import DraftModelDrafter

        return DraftModelDrafter.from_manifest(manifest, backend, device, threads)
    raise ArtifactError(f"manifest names an unknown drafter kind '{kind}'")

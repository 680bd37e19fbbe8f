"""The trainable drafters: Medusa heads and a small draft LM, both tied to a target model.

Medusa: K heads, each a residual block (h + SiLU(W h + b)) on the target's last hidden state,
sharing the target's frozen lm_head. Head k predicts the token k+1 positions after the next one.

Draft LM: a Llama with the target's tokenizer, embeddings, final norm and lm_head (all frozen and
shared, so not stored) and a few decoder layers initialised from the target's own layers.
Only the trainable tensors are saved (safetensors), which keeps trained drafters a few MB.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from treespec.errors import InputError


class MedusaHeads(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, lm_head: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        for block in self.blocks:  # start as the identity: every head begins as the target's head
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)
        self.lm_head = lm_head
        self.lm_head.requires_grad_(False)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B,T,H] -> [B,T,K,V]"""
        states = torch.stack([hidden + nn.functional.silu(block(hidden)) for block in self.blocks], dim=2)
        return self.lm_head(states.to(self.lm_head.weight.dtype))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("blocks.")}


class MedusaTopK(nn.Module):
    """The exported Medusa graph: hidden_states -> top-k ids and log-probs per head (+ logits)."""

    def __init__(self, heads: MedusaHeads, top_k: int, with_logits: bool):
        super().__init__()
        self.heads, self.top_k, self.with_logits = heads, top_k, with_logits

    def forward(self, hidden_states):
        logits = self.heads.head_logits(hidden_states).float()
        logprobs, ids = torch.topk(torch.log_softmax(logits, dim=-1), self.top_k, dim=-1)
        return (ids, logprobs, logits) if self.with_logits else (ids, logprobs)


def make_draft_model(target: nn.Module, num_layers: int, source_layers: list[int] | None = None) -> nn.Module:
    """A draft LM sharing the target's embeddings, norm and lm_head, with `num_layers` decoder
    layers copied from the target (evenly spread unless `source_layers` is given)."""
    total = len(target.model.layers)
    if not 1 <= num_layers < total:
        raise InputError(f"a draft model needs between 1 and {total - 1} layers, got {num_layers}")
    if source_layers is None:
        source_layers = [round(i * (total - 1) / max(num_layers - 1, 1)) for i in range(num_layers)]
    # Shallow copies share embeddings, norm, lm_head and rotary embedding with the target; the
    # module dicts are copied so that replacing the layers does not touch the target.
    draft = copy.copy(target)
    draft._modules = dict(target._modules)
    draft.model = copy.copy(target.model)
    draft.model._modules = dict(target.model._modules)
    draft.model.layers = nn.ModuleList(copy.deepcopy(target.model.layers[i]) for i in source_layers)
    # Its own rotary embedding (a few floats): a cast of the draft must not change the target's.
    draft.model.rotary_emb = copy.deepcopy(target.model.rotary_emb)
    draft.config = copy.deepcopy(target.config)
    draft.config.num_hidden_layers = num_layers
    for i, layer in enumerate(draft.model.layers):
        layer.self_attn.layer_idx = i
    draft.config.layer_types = draft.config.layer_types[:num_layers] if getattr(
        draft.config, "layer_types", None) else None
    draft.model.embed_tokens.requires_grad_(False)
    draft.lm_head.requires_grad_(False)
    draft.model.norm.requires_grad_(False)
    return draft


def draft_trainable_state(draft: nn.Module) -> dict[str, torch.Tensor]:
    return {f"layers.{k}": v for k, v in draft.model.layers.state_dict().items()}


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Floating tensors as fp16, integer ones (an EAGLE head's draft_vocab ids) as they are."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in state.items()}, str(path), metadata=metadata)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, metadata
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from None


def _meta_int(metadata: dict[str, str], key: str, path: Path) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{path}: metadata '{key}' must be an integer, got {value!r}") from None


def check_compatible(metadata: dict[str, str], target_config, path: Path) -> None:
    """Refuse weights trained for another target (vocabulary or width differs)."""
    for key, want in (("vocab_size", target_config.vocab_size), ("hidden_size", target_config.hidden_size)):
        got = _meta_int(metadata, key, path)
        if got is not None and got != int(want):
            raise InputError(f"{path}: drafter was trained for {key}={got}, the target has {want} "
                             "(drafter weights only fit the model they were trained for)")


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path, strict: bool):
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as exc:  # shape mismatch: weights for a model of another width
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line),
                      str(exc).splitlines()[0])
        raise InputError(f"{path}: drafter weights do not fit the target ({detail})") from None


def medusa_from_weights(target: nn.Module, path: Path | None, num_heads: int = 4) -> MedusaHeads:
    cfg = target.config
    if path is None:
        return MedusaHeads(cfg.hidden_size, num_heads, target.lm_head)
    state, meta = load_weights(path)
    check_compatible(meta, cfg, path)
    num_heads = _meta_int(meta, "num_heads", path) or len(state) // 2
    if num_heads <= 0:
        raise InputError(f"{path}: not a Medusa heads file (no heads)")
    heads = MedusaHeads(cfg.hidden_size, num_heads, target.lm_head)
    missing = _load_state(heads, state, path, strict=False).missing_keys
    if any(k.startswith("blocks.") for k in missing):
        raise InputError(f"{path}: not a Medusa heads file (missing {missing[:2]})")
    return heads


def default_draft_layers(target: nn.Module) -> int:
    return 1 if len(target.model.layers) <= 4 else 2


def draft_from_weights(target: nn.Module, path: Path | None, num_layers: int | None = None) -> nn.Module:
    num_layers = num_layers or default_draft_layers(target)
    if path is None:
        return make_draft_model(target, num_layers)
    state, meta = load_weights(path)
    check_compatible(meta, target.config, path)
    draft = make_draft_model(target, _meta_int(meta, "num_layers", path) or num_layers)
    layer_state = {k[len("layers."):]: v for k, v in state.items() if k.startswith("layers.")}
    if not layer_state:
        raise InputError(f"{path}: not a draft-model file (no layers.* tensors)")
    _load_state(draft.model.layers, layer_state, path, strict=True)
    return draft

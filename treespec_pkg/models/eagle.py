"""The EAGLE head: one decoder layer of the target's shape that drafts from the target's features.

Why: a verify step of the 135M target costs about the same at 1 and at 64 tree tokens, so tokens
per step is the whole lever; the DESIGN probe showed that one layer reading the target's own last
feature drafts as well as a 3-layer draft LM. Row t of the head fuses the target's feature at
position t (its final hidden state AFTER the final norm: TreeDecoder's `hidden_states`) with the
embedding of token t+1, and predicts the feature at position t+1:

    concat(embed(x[t+1]), f[t]) -> fc (2H -> H) -> one Llama layer -> f^[t+1] -> lm_head -> x[t+2]

The target's frozen lm_head is applied to the predicted feature directly, with no final norm
(EAGLE-1): the target's features are already normed, lm_head(f) is exactly the target's logits,
so the regression target and the token loss agree; a second norm would map f to norm(f) != f.
Embeddings and lm_head are the target's, shared and frozen, never stored: the saved trainable
weights (fc + the layer, fp16) are 8.4 MB for SmolLM2.

`forward` has the project's tree graph I/O plus the feature input, so the head exports to ONNX
and runs from the runtime like the other graphs (query t sees cache rows c < past_lengths[b] and
new rows j with tree_mask[b,t,j]; the attention code is TreeDecoder's, through TreeLayers). The
position of row t is t (the position of its feature), and its K/V go to cache row t.

`unroll` is the training-time test (EAGLE-3): step k feeds the head its own feature predicted at
step k-1 and sees the true context's cache plus its own chain, as it will when drafting.

A head file may also hold a draft vocabulary (EAGLE-3's, treespec.models.draft_vocab): the head
then owns the [K, H] rows of lm_head for those K target ids and its logits are over them.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from treespec.errors import InputError
from treespec.models.draft_vocab import DRAFT_VOCAB, checked_draft_vocab, subset_lm_head
from treespec.models.drafter_models import _load_state, _meta_int, check_compatible, load_weights, save_weights
from treespec.models.tree_model import TreeLayers

EAGLE_KIND = "eagle"


class EagleHead(nn.Module):
    def __init__(self, target: nn.Module, layer: nn.Module, attention: str = "decomposed"):
        super().__init__()
        cfg = target.config
        hidden = cfg.hidden_size
        self.hidden_size = hidden
        self.vocab_size = cfg.vocab_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        # Its own copy of the rotary embedding: casting the head must never touch the target's modules
        # (a cast of a shared rotary buffer changed the target under its captured CUDA graphs).
        self.core = TreeLayers(nn.ModuleList([layer]), copy.deepcopy(target.model.rotary_emb), cfg, attention)
        self.embed = target.model.embed_tokens  # shared with the target, frozen, not stored
        self.lm_head = target.lm_head  # shared with the target, frozen, not stored
        self.embed.requires_grad_(False)
        self.lm_head.requires_grad_(False)
        self.draft_vocab: torch.Tensor | None = None  # int64 [K] target ids the logits are over (None: all)

    @property
    def layer(self) -> nn.Module:
        return self.core.layers[0]

    def place(self, device: torch.device | str, dtype: torch.dtype) -> "EagleHead":
        """Move the head's own modules (fc, layer, rotary: the rotary keeps its dtype) to device and
        dtype. Never `.to()` the whole head: its embeddings and lm_head are the target's."""
        self.fc.to(device=device, dtype=dtype)
        self.layer.to(device=device, dtype=dtype)
        self.core.rotary.to(device=device)
        if self.draft_vocab is not None:  # the head's own lm_head rows: they go along (in the target's dtype)
            self.lm_head.to(device=device)
            self.draft_vocab = self.draft_vocab.to(device)
        return self

    def use_draft_vocab(self, draft_vocab: torch.Tensor) -> "EagleHead":
        """Draft over these sorted target ids only: lm_head becomes the head's own copy of their rows
        (its logits are [..., K]; callers map positions back with draft_vocab.target_ids)."""
        if self.draft_vocab is not None:
            raise ValueError("the head has a draft vocabulary already")
        self.lm_head = subset_lm_head(self.lm_head, draft_vocab)
        self.draft_vocab = draft_vocab.to(self.lm_head.weight.device)
        return self

    def forward(self, hidden_states, input_ids, position_ids, tree_mask, past_lengths, past_key_0, past_value_0):
        """-> logits [B,T,V] fp32 ([B,T,K] with a draft vocabulary), predicted features [B,T,H],
        new_key_0/new_value_0 [B,KVH,T,D]."""
        fused = self.fuse(hidden_states, input_ids)
        out, (key, value) = self.core.decode_layers(fused, position_ids, tree_mask, past_lengths,
                                                    (past_key_0, past_value_0))
        return self.logits(out), out, key, value

    def fuse(self, features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """fc(concat(embed(x[t+1]), f[t])): [B,T,H] + [B,T] -> [B,T,H]."""
        emb = self.embed(input_ids).to(features.dtype)
        return self.fc(torch.cat([emb, features], dim=-1))

    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        return self.lm_head(predicted.to(self.lm_head.weight.dtype)).float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.fc.parameters()) + list(self.layer.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"fc.{k}": v for k, v in self.fc.state_dict().items()}
        state.update({f"layer.{k}": v for k, v in self.layer.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor], path: Path) -> None:
        fc = {k[len("fc."):]: v for k, v in state.items() if k.startswith("fc.")}
        layer = {k[len("layer."):]: v for k, v in state.items() if k.startswith("layer.")}
        if not fc or not layer:
            raise InputError(f"{path}: not an EAGLE head file (needs fc.* and layer.* tensors)")
        _load_state(self.fc, fc, path, strict=True)
        _load_state(self.layer, layer, path, strict=True)

    def unroll(self, features: torch.Tensor, input_ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test over whole sequences: features [B,L,H] and ids [B,L] of the target.

        Row i (0 <= i < L-1) pairs position i with token i+1. Step 1 reads the target's features
        (causal); step k reads the step k-1 prediction of row i-1 and attends to step 1's keys of
        rows <= i-k+1 (the true context) and to its own chain (step j's key of row i-(k-j)).
        Returns the predicted features of every step, [B,L-1,H] each; at step k, rows i >= k-1
        are meaningful and all target position i+1 (feature) and token i+2."""
        if self.core.attention != "decomposed":
            raise ValueError("unroll needs the decomposed attention")
        batch, length, _ = features.shape
        tokens, dev = length - 1, features.device
        ids, positions = input_ids[:, 1:], torch.arange(tokens, device=dev).expand(batch, tokens)
        rope = self.core.rotary(features, positions)
        rope = (rope[0].unsqueeze(1), rope[1].unsqueeze(1))
        row = torch.arange(tokens, device=dev)
        diag_bias = self._bias(row[:, None] == row[None, :], features.dtype)
        keys, values, outputs = [], [], []
        feats = features[:, :-1]
        for k in range(1, steps + 1):
            if k == 1:
                past_bias = features.new_zeros(1, 1, 1, 0)
                tree_bias = self._bias(row[None, :] <= row[:, None], features.dtype)
            else:
                feats = torch.cat([torch.zeros_like(outputs[-1][:, :1]), outputs[-1][:, :-1]], dim=1)
                past_bias, tree_bias = self._unroll_bias(row, k, features.dtype), diag_bias
            past_k = torch.cat(keys, dim=2) if keys else features.new_zeros(batch, self.core.num_kv_heads, 0,
                                                                            self.core.head_dim)
            past_v = torch.cat(values, dim=2) if values else past_k
            out, key, value = self.core.layer_step(self.layer, self.fuse(feats, ids), rope, past_k, past_v,
                                                   None, None, (past_bias, tree_bias))
            keys.append(key)
            values.append(value)
            outputs.append(out)
        return outputs

    @staticmethod
    def _bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """bool [T,C] -> additive [1,1,T,C] (decomposed attention's bias, same for every sequence)."""
        return torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]

    def _unroll_bias(self, row: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
        """Visibility of the cache [step 1 rows | step 2 rows | ... | step k-1 rows] at step k."""
        blocks = [row[None, :] <= row[:, None] - (k - 1)]  # step 1: the true context up to i-k+1
        blocks += [row[None, :] == row[:, None] - (k - j) for j in range(2, k)]  # its own chain
        return self._bias(torch.cat(blocks, dim=1), dtype)


def make_eagle_head(target: nn.Module, attention: str = "decomposed", init_layer: int = -1) -> EagleHead:
    """A head for `target` (a loaded HF Llama-family model) that starts as the identity on the
    feature: its layer a copy of the target's layer `init_layer` (default: the last) with both
    output projections zeroed (the target's late layers write large values into the residual
    stream: SmolLM2's last layer moved the normed feature by ~100 in smooth-L1), fc passing the
    feature through."""
    layer = copy.deepcopy(target.model.layers[init_layer])
    nn.init.zeros_(layer.self_attn.o_proj.weight)
    nn.init.zeros_(layer.mlp.down_proj.weight)
    layer.requires_grad_(True)
    head = EagleHead(target, layer, attention)
    hidden = target.config.hidden_size
    with torch.no_grad():  # start near identity on the feature half, small on the embedding half
        head.fc.weight.normal_(0.0, 0.02 / hidden ** 0.5)
        head.fc.weight[:, hidden:] += torch.eye(hidden)
        head.fc.bias.zero_()
    return head.place(head.embed.weight.device, next(layer.parameters()).dtype)


def eagle_metadata(target_config, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"kind": EAGLE_KIND, "vocab_size": str(target_config.vocab_size),
            "hidden_size": str(target_config.hidden_size), "num_layers": "1", "final_norm": "0",
            **(extra or {})}


def save_eagle(head: EagleHead, path: Path, metadata: dict[str, str]) -> None:
    """The trainable weights only (fc + layer), fp16 safetensors, with `metadata`; and the draft
    vocabulary's ids (int64) when the head has one."""
    state = head.trainable_state()
    if head.draft_vocab is not None:
        state[DRAFT_VOCAB] = head.draft_vocab
    save_weights(state, path, metadata)


def eagle_from_weights(target: nn.Module, path: Path | None, attention: str = "decomposed",
                       draft_vocab: bool = True) -> EagleHead:
    """The head for `target` with the weights in `path` (an untrained head when path is None), over
    the file's draft vocabulary if it has one (`draft_vocab` False: over the full one, as training
    runs)."""
    if path is None:
        return make_eagle_head(target, attention)
    state, meta = load_weights(path)
    vocab = state.pop(DRAFT_VOCAB, None)
    check_compatible(meta, target.config, path)
    if meta.get("kind", EAGLE_KIND) != EAGLE_KIND:
        raise InputError(f"{path}: a '{meta['kind']}' drafter file, not an EAGLE head")
    if (_meta_int(meta, "num_layers", path) or 1) != 1:
        raise InputError(f"{path}: EAGLE heads have one layer, the file says {meta['num_layers']}")
    head = make_eagle_head(target, attention)
    dtype = next(head.layer.parameters()).dtype
    head.load_trainable_state({k: v.to(dtype) for k, v in state.items()}, path)
    if vocab is not None and draft_vocab:
        head.use_draft_vocab(checked_draft_vocab(vocab, target.config.vocab_size, path))
    return head

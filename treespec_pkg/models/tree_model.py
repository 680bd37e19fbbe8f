"""A Llama-family decoder with the project's tree graph I/O, built on an HF model's own modules.

The HF modules (embeddings, projections, MLPs, norms, rotary embedding) are reused as they are;
only the forward pass is ours, so that the exported graph has exactly the contract of DESIGN:

inputs  input_ids [B,T] int64, position_ids [B,T] int64, tree_mask [B,T,T] bool,
        past_lengths [B] int64, past_key_i / past_value_i [B,KVH,C,D] (fixed-capacity cache)
outputs logits [B,T,V], hidden_states [B,T,H], new_key_i / new_value_i [B,KVH,T,D]

Query t of sequence b sees cache rows c < past_lengths[b] and new tokens j with tree_mask[b,t,j].
"""
from __future__ import annotations

import math

import torch
from torch import nn

ATTENTION_MODES = ("decomposed", "onnx", "ort-mha", "plugin")


def graph_input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "position_ids", "tree_mask", "past_lengths"]
    for i in range(num_layers):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


def graph_output_names(num_layers: int) -> list[str]:
    names = ["logits", "hidden_states"]
    for i in range(num_layers):
        names += [f"new_key_{i}", f"new_value_{i}"]
    return names


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TreeLayers(nn.Module):
    """Decoder layers with the tree-attention forward: the part that TreeDecoder and the EAGLE
    head (treespec.models.eagle, one layer of the target's shape) share."""

    def __init__(self, layers: nn.ModuleList, rotary: nn.Module, cfg, attention: str = "decomposed"):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention
        self.layers = layers
        self.rotary = rotary
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def decode_layers(self, hidden, position_ids, tree_mask, past_lengths, past_kv):
        """hidden [B,T,H] through every layer -> (hidden [B,T,H], [new_key_i, new_value_i, ...])."""
        cos, sin = self.rotary(hidden, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B,1,T,D]
        capacity = past_kv[0].shape[2]
        rows = torch.arange(capacity, device=position_ids.device)
        past_visible = rows.unsqueeze(0) < past_lengths.unsqueeze(1)  # [B,C]
        masks = self._attention_masks(past_visible, tree_mask, hidden.dtype)
        new_kv = []
        for i, layer in enumerate(self.layers):
            hidden, k, v = self.layer_step(layer, hidden, (cos, sin), past_kv[2 * i], past_kv[2 * i + 1],
                                           past_lengths, tree_mask, masks)
            new_kv += [k, v]
        return hidden, new_kv

    def layer_step(self, layer, hidden, rope, past_k, past_v, past_lengths, tree_mask, masks):
        """One decoder layer's tree step -> (hidden [B,T,H], new key, new value [B,KVH,T,D])."""
        batch, tokens, _ = hidden.shape
        cos, sin = rope
        residual = hidden
        x = layer.input_layernorm(hidden)
        attn = layer.self_attn
        q = attn.q_proj(x).view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = self._attend(q, k, v, past_k, past_v, past_lengths, tree_mask, masks)
        out = out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        hidden = residual + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, k, v

    def _attention_masks(self, past_visible, tree_mask, dtype):
        """Per-step masks shared by all layers (built once per forward)."""
        tokens = tree_mask.shape[1]
        if self.attention == "decomposed":
            neg = torch.finfo(dtype).min
            past_bias = torch.where(past_visible, 0.0, neg).to(dtype)[:, None, None, :]
            tree_bias = torch.where(tree_mask, 0.0, neg).to(dtype)[:, None, :, :]
            return past_bias, tree_bias  # [B,1,1,C], [B,1,T,T]
        if self.attention in ("onnx", "ort-mha"):
            full = torch.cat([past_visible.unsqueeze(1).expand(-1, tokens, -1), tree_mask], dim=-1)
            if self.attention == "onnx":
                return full.unsqueeze(1)  # bool [B,1,T,C+T]
            neg = torch.finfo(dtype).min
            return torch.where(full, 0.0, neg).to(dtype).unsqueeze(1)  # additive [B,1,T,C+T]
        return None

    def _attend(self, q, k, v, past_k, past_v, past_lengths, tree_mask, masks):
        if self.attention == "decomposed":
            return self._attend_decomposed(q, k, v, past_k, past_v, *masks)
        if self.attention == "onnx":
            return self._attend_onnx(q, k, v, past_k, past_v, masks)
        if self.attention == "ort-mha":
            return self._attend_ort_mha(q, k, v, past_k, past_v, masks)
        from treespec.plugins.tree_attention.onnx_op import tree_attention_op

        return tree_attention_op(q, k, v, past_k, past_v, past_lengths, tree_mask, self.scale)

    def _attend_decomposed(self, q, k, v, past_k, past_v, past_bias, tree_bias):
        # Scores against the cache and against the new tokens are computed separately and only
        # the small score tensors are concatenated, so the cache itself is never copied.
        # GQA folds the G query heads of a KV head into the row axis instead of repeating K/V.
        batch, _, tokens, dim = q.shape
        groups = self.num_heads // self.num_kv_heads
        qg = q.reshape(batch, self.num_kv_heads, groups * tokens, dim)
        s_past = torch.matmul(qg, past_k.transpose(-1, -2)) * self.scale  # [B,KVH,G*T,C]
        s_new = torch.matmul(qg, k.transpose(-1, -2)) * self.scale  # [B,KVH,G*T,T]
        capacity = past_k.shape[2]
        s_past = s_past.view(batch, self.num_kv_heads, groups, tokens, capacity) + past_bias.unsqueeze(2)
        s_new = s_new.view(batch, self.num_kv_heads, groups, tokens, tokens) + tree_bias.unsqueeze(2)
        probs = torch.softmax(torch.cat([s_past, s_new], dim=-1).float(), dim=-1).to(q.dtype)
        p_past = probs[..., :capacity].reshape(batch, self.num_kv_heads, groups * tokens, capacity)
        p_new = probs[..., capacity:].reshape(batch, self.num_kv_heads, groups * tokens, tokens)
        out = torch.matmul(p_past, past_v) + torch.matmul(p_new, v)
        return out.view(batch, self.num_heads, tokens, dim)

    def _attend_onnx(self, q, k, v, past_k, past_v, bool_mask):
        # opset-23 Attention takes one key set, so cache and new rows are joined here (ORT's
        # own past_key input would do the same concatenation, and needs present outputs).
        keys = torch.cat([past_k, k], dim=2)
        values = torch.cat([past_v, v], dim=2)
        out, _, _, _ = torch.onnx.ops.attention(q, keys, values, attn_mask=bool_mask, scale=self.scale)
        return out

    def _attend_ort_mha(self, q, k, v, past_k, past_v, bias):
        keys = torch.cat([past_k, k], dim=2)
        values = torch.cat([past_v, v], dim=2)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        if torch.onnx.is_in_onnx_export():
            batch, heads, tokens, dim = q.shape
            q3 = q.transpose(1, 2).reshape(batch, tokens, heads * dim)
            out = torch.onnx.ops.symbolic(
                "com.microsoft::MultiHeadAttention",
                (q3, keys, values, None, None, bias),
                attrs={"num_heads": heads, "scale": self.scale},
                dtype=q.dtype,
                shape=q3.shape,
                version=1,
            )
            return out.view(batch, tokens, heads, dim).transpose(1, 2)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * self.scale + bias
        return torch.matmul(torch.softmax(scores.float(), -1).to(q.dtype), values)


class TreeDecoder(TreeLayers):
    """Tree-attention forward over a loaded HF causal LM (Llama, SmolLM, Qwen2, Mistral)."""

    def __init__(self, hf_model: nn.Module, attention: str = "decomposed"):
        super().__init__(hf_model.model.layers, hf_model.model.rotary_emb, hf_model.config, attention)
        self.embed = hf_model.model.embed_tokens
        self.norm = hf_model.model.norm
        self.lm_head = hf_model.lm_head

    def forward(self, input_ids, position_ids, tree_mask, past_lengths, *past_kv):
        hidden = self.embed(input_ids)
        hidden, new_kv = self.decode_layers(hidden, position_ids, tree_mask, past_lengths, past_kv)
        hidden = self.norm(hidden)
        logits = self.lm_head(hidden).float()
        return (logits, hidden, *new_kv)

"""Tiny random-weight graphs with the project's exact tree-graph I/O, for engine-builder tests.

`write_tiny_artifacts(dir)` exports target.onnx, draft.onnx and medusa.onnx (a 2-layer GQA
decoder with a fixed-capacity KV cache, and 2 Medusa heads) and writes a manifest.json whose
graph entries carry exactly what `treespec.exporter.engines` reads. No transformers needed.
"""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from treespec.artifacts import SCHEMA_VERSION

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 32, 4, 2, 8, 64
MEDUSA_HEADS, MEDUSA_TOPK = 2, 4
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def input_names(layers: int = LAYERS) -> list[str]:
    names = ["input_ids", "position_ids", "tree_mask", "past_lengths"]
    for i in range(layers):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


def output_names(layers: int = LAYERS) -> list[str]:
    names = ["logits", "hidden_states"]
    for i in range(layers):
        names += [f"new_key_{i}", f"new_value_{i}"]
    return names


class TinyTreeDecoder(nn.Module):
    """Decomposed tree attention against a fixed-capacity cache; learned position embeddings."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Embedding(4096, HIDDEN)
        self.qkv = nn.ModuleList(nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM) for _ in range(LAYERS))
        self.out = nn.ModuleList(nn.Linear(HEADS * HEAD_DIM, HIDDEN) for _ in range(LAYERS))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.SiLU(), nn.Linear(2 * HIDDEN, HIDDEN))
            for _ in range(LAYERS)
        )
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, position_ids, tree_mask, past_lengths, *past_kv):
        batch, tokens = input_ids.shape
        hidden = self.embed(input_ids) + self.pos(position_ids)
        capacity = past_kv[0].shape[2]
        rows = torch.arange(capacity, device=input_ids.device)
        neg = torch.finfo(hidden.dtype).min
        past_bias = torch.where(rows[None, :] < past_lengths[:, None], 0.0, neg).to(hidden.dtype)
        tree_bias = torch.where(tree_mask, 0.0, neg).to(hidden.dtype)
        groups = HEADS // KV_HEADS
        new_kv = []
        for i in range(LAYERS):
            qkv = self.qkv[i](hidden)
            q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
            q = q.view(batch, tokens, KV_HEADS, groups, HEAD_DIM).permute(0, 2, 3, 1, 4)
            q = q.reshape(batch, KV_HEADS, groups * tokens, HEAD_DIM)
            k = k.view(batch, tokens, KV_HEADS, HEAD_DIM).transpose(1, 2)
            v = v.view(batch, tokens, KV_HEADS, HEAD_DIM).transpose(1, 2)
            s_past = torch.matmul(q, past_kv[2 * i].transpose(-1, -2)).view(batch, KV_HEADS, groups, tokens, capacity)
            s_new = torch.matmul(q, k.transpose(-1, -2)).view(batch, KV_HEADS, groups, tokens, tokens)
            s_past = s_past * HEAD_DIM**-0.5 + past_bias[:, None, None, None, :]
            s_new = s_new * HEAD_DIM**-0.5 + tree_bias[:, None, None, :, :]
            probs = torch.softmax(torch.cat([s_past, s_new], dim=-1).float(), dim=-1).to(q.dtype)
            p_past = probs[..., :capacity].reshape(batch, KV_HEADS, groups * tokens, capacity)
            p_new = probs[..., capacity:].reshape(batch, KV_HEADS, groups * tokens, tokens)
            att = torch.matmul(p_past, past_kv[2 * i + 1]) + torch.matmul(p_new, v)
            att = att.view(batch, KV_HEADS, groups, tokens, HEAD_DIM).permute(0, 3, 1, 2, 4)
            hidden = hidden + self.out[i](att.reshape(batch, tokens, HEADS * HEAD_DIM))
            hidden = hidden + self.mlp[i](hidden)
            new_kv += [k, v]
        hidden = self.norm(hidden)
        return (self.lm_head(hidden).float(), hidden, *new_kv)


class TinyMedusa(nn.Module):
    """K residual heads over the final hidden states, sharing one lm_head; in-graph top-k."""

    def __init__(self, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(MEDUSA_HEADS))
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, hidden_states):
        outs = [hidden_states + torch.nn.functional.silu(head(hidden_states)) for head in self.heads]
        logits = self.lm_head(torch.stack(outs, dim=2)).float()  # [B,T,K,V]
        logprobs = torch.log_softmax(logits, dim=-1)
        top_lp, top_ids = torch.topk(logprobs, MEDUSA_TOPK, dim=-1)
        return top_ids, top_lp


def _example_decoder_inputs(dtype: torch.dtype, batch=2, tokens=3, capacity=5):
    ids = torch.randint(0, VOCAB, (batch, tokens))
    pos = torch.arange(tokens).repeat(batch, 1) + 2
    mask = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool)).repeat(batch, 1, 1)
    lengths = torch.tensor([2, 4][:batch], dtype=torch.int64)
    past = [torch.zeros(batch, KV_HEADS, capacity, HEAD_DIM, dtype=dtype) for _ in range(2 * LAYERS)]
    return (ids, pos, mask, lengths, *past)


def _export(module: nn.Module, args: tuple, path: Path, names_in, names_out, dynamic_shapes) -> None:
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=names_in, output_names=names_out,
            dynamic_shapes=dynamic_shapes, opset_version=18, optimize=True, verbose=False,
        )
    program.save(str(path))


def export_tiny_graphs(out_dir: Path, precision: str = "fp32", graphs=("target", "draft", "medusa")) -> None:
    dtype = TORCH_DTYPES[precision]
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    tokens = torch.export.Dim("tree_tokens", min=1, max=8192)
    capacity = torch.export.Dim("past", min=1, max=131072)
    dec_shapes = (
        {0: batch, 1: tokens}, {0: batch, 1: tokens}, {0: batch, 1: tokens, 2: tokens}, {0: batch},
        tuple({0: batch, 2: capacity} for _ in range(2 * LAYERS)),
    )
    if "target" in graphs or "draft" in graphs:
        model = TinyTreeDecoder().to(dtype).eval()
        _export(model, _example_decoder_inputs(dtype), out_dir / "target.onnx", input_names(), output_names(),
                dec_shapes)
        if "draft" in graphs:  # same I/O contract; its weights do not matter to an engine builder
            shutil.copyfile(out_dir / "target.onnx", out_dir / "draft.onnx")
    if "medusa" in graphs:
        medusa = TinyMedusa().to(dtype).eval()
        _export(medusa, (torch.randn(2, 3, HIDDEN, dtype=dtype),), out_dir / "medusa.onnx",
                ["hidden_states"], ["topk_ids", "topk_logprobs"], ({0: batch, 1: tokens},))


def tiny_manifest(precision: str, graphs=("target", "draft", "medusa"), max_context: int = 256) -> dict:
    profile = {"batch": [1, 1, 2], "tree_tokens": [1, 8, 16], "past": [1, 128, max_context]}
    entries = {
        name: {"onnx": f"{name}.onnx", "precision": precision, "attention": "decomposed",
               "profile": profile if name != "medusa" else {"batch": [1, 1, 2], "tree_tokens": [1, 8, 16]},
               "engines": []}
        for name in graphs
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"num_layers": LAYERS, "num_heads": HEADS, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "hidden_size": HIDDEN, "vocab_size": VOCAB, "max_context": max_context},
        "tokenizer": {"path": "tokenizer"},
        "graphs": entries,
    }


def write_tiny_artifacts(out_dir: Path, precision: str = "fp32", graphs=("target", "draft", "medusa")) -> dict:
    export_tiny_graphs(out_dir, precision, graphs)
    manifest = tiny_manifest(precision, graphs)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

"""The random 8-token Llama behind the chi-square tests of the sampling verifier (plain drafters in
tests/test_sampling_distribution.py, the EAGLE head in tests/test_eagle.py): peaked but not one-hot
next-token distributions, exported by our exporter and run by ONNX Runtime."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from treespec.exporter.onnx_export import export_tree_graph
from treespec.models.tree_model import TreeDecoder
from treespec.runtime.backends.onnxruntime import OnnxRuntimeBackend, open_session

VOCAB = 8


def vocab8_model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=7)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    return model


def vocab8_backend(model: LlamaForCausalLM, folder: Path) -> OnnxRuntimeBackend:
    path = export_tree_graph(TreeDecoder(model), folder / "target.onnx")
    return OnnxRuntimeBackend(open_session(path, "cpu", threads=1), num_layers=2, num_kv_heads=1, head_dim=16)

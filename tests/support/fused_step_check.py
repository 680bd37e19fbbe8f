"""The fused decoder step (treespec.models.fused_decoder) against TreeDecoder on a tiny random
Llama, in fp32 on the CPU under Triton's interpreter: `TRITON_INTERPRET=1 python
tests/support/fused_step_check.py` prints one JSON line of worst errors relative to each
reference's peak. Covers a tree step with a past (two sequences, different lengths, padded rows)
and the torch backend with fused=True against the unfused backend over steps and commits.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from transformers import LlamaForCausalLM

from treespec.models.checkpoint import tiny_random_config
from treespec.models.fused_decoder import FusedDecoder
from treespec.models.tree_model import TreeDecoder
from treespec.plugins.tree_attention.ordered_check import random_tree
from treespec.runtime.backends.base import StepInputs
from treespec.runtime.backends.torch_backend import TorchBackend
from treespec.runtime.trees.tree import batch_tree_inputs, chain_tree


def _err(got, ref) -> float:
    got, ref = torch.as_tensor(np.asarray(got)).float(), torch.as_tensor(np.asarray(ref)).float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def tiny_model(vocab: int = 320, bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tiny_random_config(vocab)
    cfg.attention_bias = cfg.mlp_bias = bias  # biases: Qwen2-like projections
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() == 2 else p.uniform_(0.8, 1.2)  # norms (and biases) not 1 / 0
    return model


def decoder_step(model, gen, gemm: str) -> dict:
    """One tree step with a past: the fused step vs TreeDecoder (decomposed attention)."""
    ref_dec = TreeDecoder(model)
    fused = FusedDecoder(ref_dec, gemm)
    layers, kvh, dim = ref_dec.num_layers, ref_dec.num_kv_heads, ref_dec.head_dim
    batch, tokens, real = 2, 16, 11
    lengths = torch.tensor([37, 9])
    rows = 80
    cache = torch.zeros(2 * layers, batch, kvh, rows, dim)
    cache[:, :, :, :int(lengths.max())] = torch.randn(2 * layers, batch, kvh, int(lengths.max()), dim, generator=gen)
    ids = torch.randint(0, 320, (batch, tokens), generator=gen)
    mask = torch.eye(tokens, dtype=torch.bool).repeat(batch, 1, 1)
    pos = lengths[:, None].repeat(1, tokens)
    for b in range(batch):
        parents, tree = random_tree(real, gen)
        mask[b, :real, :real] = tree
        pos[b, :real] += tree.sum(-1) - 1
    past = [cache[i, :, :, :int(lengths.max())].clone() for i in range(2 * layers)]
    with torch.no_grad():
        ref = ref_dec(ids, pos, mask, lengths, *past)
        out = fused(ids, pos, mask.to(torch.int64), lengths, cache)
    new_kv = 0.0
    for i in range(2 * layers):
        for b in range(batch):
            n = int(lengths[b])
            new_kv = max(new_kv, _err(cache[i, b, :, n:n + tokens], ref[2 + i][b]))
    return {"logits": _err(out.logits, ref[0]), "hidden": _err(out.hidden, ref[1]), "new_kv": new_kv,
            "argmax_equal": bool(torch.equal(out.argmax, ref[0].argmax(-1)))}


def backend_steps(model, gen) -> float:
    """TorchBackend(fused=True and "triton") vs the unfused backend on the CPU: prefill, a tree step, a commit
    of a non-contiguous path, another tree step. Worst logits error."""
    backends = [TorchBackend(model, "cpu", fused=f) for f in (False, True, "triton")]
    assert backends[0].fused is None and backends[1].fused.gemm == "cublas" and backends[2].fused.gemm == "triton"
    prompt = torch.randint(0, 320, (21,), generator=gen).tolist()
    tree = random_tree(9, gen)
    worst = 0.0
    outs = []
    for be in backends:
        be.reset(1, 128)
        first = be.step(StepInputs(*batch_tree_inputs([chain_tree(prompt)], be.lengths)))
        be.commit(first, [list(range(len(prompt)))])
        ids = np.asarray(torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(3)))
        pos = be.lengths[:, None] + tree[1].sum(-1).numpy()[None] - 1
        step = be.step(StepInputs(ids, pos, tree[1].numpy()[None]))
        path = [0] + [j for j in range(1, 9) if tree[1][8, j]][:2]
        be.commit(step, [sorted(set(path))])
        last = be.step(StepInputs(*batch_tree_inputs([chain_tree([5, 6, 7])], be.lengths)))
        outs.append([np.asarray(first.logits), np.asarray(step.logits), np.asarray(last.logits)])
    for fused_outs in outs[1:]:
        for a, b in zip(outs[0], fused_outs):
            worst = max(worst, _err(b, a))
    return worst


def gemm_kinds(model) -> dict:
    """The "auto" GEMM choice picked per generation (TorchBackend.plan): plain decoding and a narrow
    tree with Triton GEMMs, a tree of more than ROW_EXACT_ROWS rows with the wide kind, a pinned kind
    kept; every generation's tokens equal to plain decoding's."""
    from treespec.runtime.drafters.lookup import LookupDrafter
    from treespec.runtime.generator import TreeGenerator
    from treespec.runtime.trees.presets import read_tree_config
    from treespec.runtime.verify import SamplingParams

    backend = TorchBackend(model, "cpu", fused="auto")
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 7]  # repeats: lookup drafts something
    kinds, outputs = {"before": backend.gemm_kind}, {}
    for name, tree in (("plain", "none"), ("chain4", "chain4"), ("longspec", "longspec")):
        engine = TreeGenerator(backend, LookupDrafter() if tree != "none" else None, [1], 256)
        outputs[name] = [t for e in engine.run([prompt], 24, read_tree_config(tree), SamplingParams())
                         for t in e.new_tokens[0]]
        kinds[name] = backend.gemm_kind
    backend.pinned_kind = "triton"
    backend.plan(1000)
    kinds["pinned"] = backend.gemm_kind
    return {"kinds": kinds, "same_tokens": all(o == outputs["plain"] for o in outputs.values())}


def main() -> None:
    gen = torch.Generator().manual_seed(11)
    model = tiny_model()
    biased = tiny_model(bias=True)
    result = {"decoder": decoder_step(model, gen, "cublas"), "decoder_triton_gemm": decoder_step(model, gen, "triton"),
              "decoder_bias": decoder_step(biased, gen, "cublas"),
              "decoder_bias_triton_gemm": decoder_step(biased, gen, "triton"),
              "backend_logits": backend_steps(model, gen), "gemm_kinds": gemm_kinds(model)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

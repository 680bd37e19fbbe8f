"""The torch backend's few-kernel decoder step: a layer is 9 kernels instead of ~40 (issue 16), or 5.

Why: on the H200 a SmolLM2 step launched ~1,200 small kernels (2.9-3.6 ms) while its weights need
0.06 ms, so the step is made of too many kernels, not of too many bytes. With cuBLAS GEMMs
(gemm="cublas"), per layer: add+RMSNorm (Triton), QKV GEMM (the three projections concatenated once
at construction), RoPE + K/V cache write (Triton), position-ordered tree attention (Triton), o_proj
GEMM, add+RMSNorm, gate/up GEMM (concatenated), SiLU*mul (Triton), down GEMM; per step, besides: the
ancestor lists (1 kernel), the final add+RMSNorm, lm_head and the argmax: 274 kernels for 30 layers.
With gemm="triton" (plugins/fused/gemm.py) the GEMMs are Triton kernels that take the add+RMSNorm as
their prologue and RoPE or SiLU*mul as their epilogue: 5 kernels a layer, 154 a step, each row's
result independent of the step's shape and batch, launched with PDL (treespec.plugins.pdl). They win
on narrow steps (1-token decoding: 0.70 against 0.85 ms on an H100) and lose on wide ones (64 rows:
1.15 against 0.92), so gemm="auto", the CUDA default, takes them for steps of <= NARROW_ROWS rows
and cuBLAS otherwise: a bucket always runs the same kernels, so losslessness is as with cuBLAS.

Same contract as TorchBackend's unfused `_forward`: the new K/V rows go straight to the cache
rows [L_b, L_b + T) of the fixed-capacity buffer [2*layers, B, KVH, rows, D] and `commit` moves
the accepted ones. Lossless: every kernel is row-local and the GEMMs' shapes are fixed per bucket
(cuBLAS) or per process (Triton), so padded plain steps and tree steps run the same kernels and a
node verified in a tree is bitwise equal to plain decoding (the ordered attention reduces keys in
position order).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from treespec.models.tree_model import TreeDecoder
from treespec.plugins.fused import gemm as triton_gemm
from treespec.plugins.fused.kernels import add_rmsnorm, rope_write, silu_mul, tree_ancestors
from treespec.plugins.tree_attention import ordered

GEMMS = ("cublas", "triton", "auto")
NARROW_ROWS = 16  # gemm="auto": Triton GEMMs for steps of at most this many rows (batch x tokens), else cuBLAS
FUSED_ANCESTORS_MAX = 128  # the one-kernel ancestor lists hold a [T, T] tile; longer prefills use torch


@dataclass
class FusedLayer:
    """One decoder layer's weights, concatenated for the fused GEMMs."""

    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2 KVH) * D, hidden]
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor  # [hidden, H * D]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * inter, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, inter]
    down_bias: torch.Tensor | None
    qk_rot: torch.Tensor | None = None  # Triton GEMMs: rotate_half of the Q and K rows [(H + KVH) * D, hidden]
    qk_rot_bias: torch.Tensor | None = None


@dataclass
class StepContext:
    """What every layer of one step reads besides its weights."""

    pos: torch.Tensor  # [B, T] int64
    lengths: torch.Tensor  # [B] int64
    cos: torch.Tensor  # [positions, D] fp32
    sin: torch.Tensor
    ancestors: torch.Tensor  # [B, T, T] int32
    depths: torch.Tensor  # [B, T] int32


@dataclass
class FusedOutputs:
    logits: torch.Tensor  # [B, T, V] in the model dtype
    hidden: torch.Tensor  # [B, T, hidden] (after the final norm)
    argmax: torch.Tensor  # [B, T] int64


def _cat_bias(linears) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0]) for m in linears])


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def fuse_layer(layer: nn.Module, rope_heads: int = 0, head_dim: int = 0) -> FusedLayer:
    """The layer's weights concatenated; with `rope_heads` (H + KVH) also the rotated Q/K rows
    that let the Triton QKV GEMM apply RoPE in its epilogue."""
    attn, mlp = layer.self_attn, layer.mlp
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"the fused step needs a SiLU MLP, this layer has {type(act).__name__}")
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    gate_up = (mlp.gate_proj, mlp.up_proj)
    fused = FusedLayer(
        input_norm=layer.input_layernorm.weight.detach(),
        qkv=torch.cat([m.weight for m in qkv]).detach().contiguous(), qkv_bias=_cat_bias(qkv),
        o_proj=attn.o_proj.weight.detach(), o_bias=attn.o_proj.bias,
        post_norm=layer.post_attention_layernorm.weight.detach(),
        gate_up=torch.cat([m.weight for m in gate_up]).detach().contiguous(), gate_up_bias=_cat_bias(gate_up),
        down=mlp.down_proj.weight.detach(), down_bias=mlp.down_proj.bias)
    if rope_heads:
        fused.qk_rot = triton_gemm.rotated_rows(fused.qkv, rope_heads, head_dim)
        if fused.qkv_bias is not None:
            fused.qk_rot_bias = triton_gemm.rotated_rows(fused.qkv_bias, rope_heads, head_dim)
    return fused


def uses_triton(gemm: str, rows: int) -> bool:
    """Whether a forward of `rows` rows (batch x tokens) runs Triton GEMMs under the GEMM kind `gemm`."""
    return gemm == "triton" or gemm == "auto" and rows <= NARROW_ROWS


@dataclass
class TritonBuffers:
    """A Triton-GEMM layer's scratch for M rows: the residual stream's two buffers (a GEMM's programs
    read one while its first column block writes the other), Q, SiLU*mul's output, and the fp32
    partial sums that o_proj and down leave for the next kernel to add."""

    stream: tuple[torch.Tensor, torch.Tensor]
    q: torch.Tensor
    act: torch.Tensor
    attn_sums: torch.Tensor
    mlp_sums: torch.Tensor

    @classmethod
    def for_rows(cls, residual: torch.Tensor, layer: FusedLayer, heads: int, dim: int) -> "TritonBuffers":
        """Buffers for the rows of `residual` [M, hidden], which becomes the stream's second buffer."""
        rows, width = residual.shape
        launch, inter = triton_gemm.LAUNCHES, layer.down.shape[1]

        def sums(name: str, k: int) -> torch.Tensor:
            return residual.new_empty(launch[name].splits(k), rows, width, dtype=torch.float32)

        return cls((torch.empty_like(residual), residual), residual.new_empty(rows, heads * dim),
                   residual.new_empty(rows, inter), sums("o", heads * dim), sums("down", inter))


def triton_layer(layer: FusedLayer, start: "triton_gemm.ResidualIn", rope: "triton_gemm.RopeOut", lengths,
                 ancestors, depths, scale: float, buf: TritonBuffers) -> None:
    """One decoder layer in five kernels (plugins/fused/gemm.py): `start` (the residual stream into
    buf.stream[0], normed) -> QKV + RoPE + the K/V write of `rope` -> attention over the cache rows
    < lengths[b] and each row's ancestors -> o_proj -> add + RMSNorm (into buf.stream[1]) + gate/up +
    SiLU*mul -> down, whose partials buf.mlp_sums the next kernel adds to buf.stream[1]."""
    launch, heads, dim = triton_gemm.LAUNCHES, rope.heads, rope.cos.shape[1]
    rows = rope.q.shape[0]
    triton_gemm.fused_linear(start, layer.qkv, layer.qkv_bias, rope.q, launch["qkv"], triton_gemm.EPI_QKV_ROPE, rope)
    q = rope.q.view(rows // rope.tokens, rope.tokens, heads, dim).transpose(1, 2)
    out = ordered.ordered_tree_attention(q, rope.k_cache, rope.v_cache, lengths, ancestors, depths, scale, pdl=True)
    triton_gemm.fused_linear(out.view(rows, heads * dim), layer.o_proj, layer.o_bias, buf.attn_sums, launch["o"])
    mlp_in = triton_gemm.ResidualIn(buf.stream[0], buf.attn_sums, layer.post_norm, buf.stream[1], start.eps)
    triton_gemm.fused_linear(mlp_in, layer.gate_up, layer.gate_up_bias, buf.act, launch["gate_up"],
                             triton_gemm.EPI_SILU_MUL)
    triton_gemm.fused_linear(buf.act, layer.down, layer.down_bias, buf.mlp_sums, launch["down"])


def grown_rope_table(rotary: nn.Module, cos: torch.Tensor | None, sin: torch.Tensor | None, rows: int,
                     device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [positions, D] fp32 of `rotary` for positions 0..rows-1: the tables given while they
    have the rows on that device, else new ones. Captured CUDA graphs read the tables by address, so
    a needless rebuild frees memory they still read: devices are compared as tensors name them
    (torch.device("cuda") is the current "cuda:N")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if cos is not None and sin is not None and cos.shape[0] >= rows and cos.device == device:
        return cos, sin
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    cos, sin = rotary(probe, torch.arange(rows, device=device)[None])
    return cos[0].float().contiguous(), sin[0].float().contiguous()


class FusedDecoder:
    """The step of a TreeDecoder (same weights, same outputs) in few kernels. Triton kernels: on
    CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, the tests)."""

    def __init__(self, decoder: TreeDecoder, gemm: str = "cublas"):
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
        self.decoder = decoder
        if not triton_gemm.tiles_fit(decoder.lm_head.weight):
            gemm = "cublas"  # fp32 on a GPU
        self.gemm = gemm  # cublas, triton (plugins/fused/gemm.py) or auto (by the step's rows)
        rope_heads = decoder.num_heads + decoder.num_kv_heads if gemm != "cublas" else 0
        with torch.no_grad():
            self.layers = [fuse_layer(layer, rope_heads, decoder.head_dim) for layer in decoder.layers]
        self.eps = _eps(decoder.layers[0].input_layernorm)
        self.final_norm = decoder.norm.weight.detach()
        self.heads, self.kv_heads, self.head_dim = decoder.num_heads, decoder.num_kv_heads, decoder.head_dim
        self.cos = self.sin = None  # [positions, D] fp32, grown to the cache's rows

    def rope_table(self, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions 0..rows-1 from the HF model's own rotary module (fp32, exact)."""
        self.cos, self.sin = grown_rope_table(self.decoder.rotary, self.cos, self.sin, rows, device)
        return self.cos, self.sin

    def __call__(self, ids, pos, tree_mask, lengths, cache) -> FusedOutputs:
        """ids, pos [B, T] int64; tree_mask [B, T, T] (int or bool, contiguous); lengths [B];
        cache [2*layers, B, KVH, rows, D]. Writes this step's K/V rows at [L_b, L_b + T)."""
        batch, tokens = ids.shape
        if tokens <= FUSED_ANCESTORS_MAX:
            ancestors, depths = tree_ancestors(tree_mask)
        else:
            ancestors, depths = ordered.tree_ancestors(tree_mask != 0)
        cos, sin = self.rope_table(cache.shape[3], cache.device)
        ctx = StepContext(pos, lengths, cos, sin, ancestors, depths)
        dec = self.decoder
        residual = torch.empty(batch * tokens, dec.embed.weight.shape[1], dtype=cache.dtype, device=cache.device)
        normed = torch.empty_like(residual)
        hidden = normed.view(batch, tokens, -1)
        if uses_triton(self.gemm, batch * tokens):
            self.triton_layers(ids, residual, normed, ctx, cache, tokens)
            # lm_head too: cuBLAS would pick its kernel (and rounding) by the step's width
            logits = triton_gemm.lm_head(normed, dec.lm_head.weight, dec.lm_head.bias).view(batch, tokens, -1)
        else:
            add_rmsnorm(dec.embed.weight, residual, normed, self.layers[0].input_norm, self.eps, ids=ids)
            for i, layer in enumerate(self.layers):
                nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.final_norm
                self.layer_step(layer, residual, normed, nxt, ctx, cache[2 * i], cache[2 * i + 1], batch, tokens)
            # Logits stay in the model dtype (host copies are fp32, exact): no [T, V] conversion kernel.
            logits = F.linear(hidden, dec.lm_head.weight, dec.lm_head.bias)
        return FusedOutputs(logits, hidden, logits.argmax(-1))

    def layer_step(self, layer: FusedLayer, residual, normed, next_norm, ctx: StepContext, k_cache, v_cache,
                   batch: int, tokens: int) -> None:
        """One layer with cuBLAS GEMMs: residual/normed [M, hidden] updated in place, normed becoming
        the input of the layer whose norm is `next_norm`."""
        heads, kvh, dim = self.heads, self.kv_heads, self.head_dim
        q = F.linear(normed, layer.qkv, layer.qkv_bias)  # [M, (H + 2 KVH) * D]
        rope_write(q, ctx.pos, ctx.lengths, ctx.cos, ctx.sin, k_cache, v_cache, tokens, heads, kvh)
        q = q.view(batch, tokens, -1)[..., :heads * dim].view(batch, tokens, heads, dim).transpose(1, 2)
        out = ordered.ordered_tree_attention(q, k_cache, v_cache, ctx.lengths, ctx.ancestors, ctx.depths,
                                             self.decoder.scale)
        add_rmsnorm(F.linear(out.view(batch * tokens, heads * dim), layer.o_proj, layer.o_bias),
                    residual, normed, layer.post_norm, self.eps)
        act = silu_mul(F.linear(normed, layer.gate_up, layer.gate_up_bias))
        add_rmsnorm(F.linear(act, layer.down, layer.down_bias), residual, normed, next_norm, self.eps)

    def triton_layers(self, ids, residual, normed, ctx: StepContext, cache, tokens: int) -> None:
        """Every layer in five kernels (triton_layer), then the final add+RMSNorm into residual/normed
        [M, hidden]. Layer 0 gathers the embedding rows instead of adding to the residual."""
        buf = TritonBuffers.for_rows(residual, self.layers[0], self.heads, self.head_dim)
        source, sums = self.decoder.embed.weight, None
        for i, layer in enumerate(self.layers):
            rope = triton_gemm.RopeOut(buf.q, layer.qk_rot, layer.qk_rot_bias, ctx.pos, ctx.lengths, ctx.cos, ctx.sin,
                                       cache[2 * i], cache[2 * i + 1], tokens, self.heads, self.kv_heads)
            start = triton_gemm.ResidualIn(source, sums, layer.input_norm, buf.stream[0], self.eps,
                                           ids if i == 0 else None)
            triton_layer(layer, start, rope, ctx.lengths, ctx.ancestors, ctx.depths, self.decoder.scale, buf)
            source, sums = buf.stream[1], buf.mlp_sums
        add_rmsnorm(buf.mlp_sums, residual, normed, self.final_norm, self.eps, pdl=True)

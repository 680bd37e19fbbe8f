"""The EAGLE head's forward in the fused decoder's kernels: ~14 kernels a head forward instead of ~50.

Why: an EAGLE-2 draft (depth 6) runs the head 6 times; through the HF-style layer
(TreeLayers.decode_layers: ~40 small kernels plus the decomposed attention over the whole cache)
it cost 2.1-2.3 ms on the H200, twice the target's fused verify step, because there a kernel costs
a few microseconds whatever it does. Here a forward is: embedding, concat, fc GEMM, RMSNorm, QKV
GEMM, RoPE + K/V write (Triton), position-ordered tree attention (Triton), o_proj GEMM, add+RMSNorm,
gate/up GEMM, SiLU*mul, down GEMM, residual add; lm_head only on the rows the caller asks for.

The head is EAGLE-1's: fc(concat(embed(x[t+1]), f[t])) -> one Llama layer -> the predicted feature
(the residual stream, no final norm: EagleHead.forward returns decode_layers' output as it is) ->
the target's lm_head. The cache is TorchEagleHead's [B, KVH, rows, D] pair. Unlike FusedDecoder,
where a step's rows go to [L_b, L_b + T), the K/V write offset (`write_at`) is separate from the
committed length (`lengths`): an EAGLE-2 level writes its K rows past the rows of the earlier
levels and attends to the cache plus its ancestors' rows there (tree-KV), see
runtime/drafters/eagle_tree.py. Triton kernels: on CUDA, or on the CPU under TRITON_INTERPRET=1.

With Triton GEMMs (gemm="triton", or "auto" for forwards of <= NARROW_ROWS rows: a draft's levels)
a forward is the target's five-kernel layer (plugins/fused/gemm.py, launched with PDL) plus the fc
GEMM and the final residual add: 7 kernels instead of 14; lm_head is a Triton GEMM too (PDL).
fc(concat(embed(x), f)) is split as E'[x] + W_f f, with E' = embed @ W_e.T + b computed once at
load ([V, H], the embedding rows the QKV GEMM's prologue gathers) and W_f f the fc GEMM's fp32
partials that the prologue adds: no embedding or concat kernel. A draft only proposes, so its rounding (E' is rounded to the dtype
before the add) never changes what the target accepts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from treespec.models.eagle import EagleHead
from treespec.models.fused_decoder import (GEMMS, TritonBuffers, _eps, fuse_layer, grown_rope_table, triton_layer,
                                           uses_triton)
from treespec.plugins.fused import gemm as triton_gemm
from treespec.plugins.fused.kernels import add_rmsnorm, rope_write, silu_mul
from treespec.plugins.tree_attention import ordered


class FusedEagleHead:
    """An EagleHead's weights, concatenated once (at load) for the fused kernels."""

    def __init__(self, head: EagleHead, gemm: str = "auto"):
        core = head.core
        if core.head_dim & (core.head_dim - 1) or core.head_dim < 16:
            raise ValueError(f"the fused EAGLE head needs a power-of-two head dim >= 16, got {core.head_dim}")
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
        self.gemm = gemm if triton_gemm.tiles_fit(head.fc.weight) else "cublas"  # fp32 on a GPU: cuBLAS
        rope_heads = core.num_heads + core.num_kv_heads if self.gemm != "cublas" else 0
        with torch.no_grad():
            self.layer = fuse_layer(head.layer, rope_heads, core.head_dim)
        self.fc_weight, self.fc_bias = head.fc.weight.detach(), head.fc.bias.detach()
        if self.gemm != "cublas":
            hidden = head.hidden_size
            with torch.no_grad():  # E' = embed @ W_e.T + b in fp32, rounded once (module doc)
                self.embed_fc = F.linear(head.embed.weight.float(), self.fc_weight[:, :hidden].float(),
                                         self.fc_bias.float()).to(self.fc_weight.dtype)
            self.fc_feat = self.fc_weight[:, hidden:].contiguous()
        self.embed = head.embed.weight.detach()
        self.lm_weight = head.lm_head.weight.detach()
        self.lm_bias = None if head.lm_head.bias is None else head.lm_head.bias.detach()
        self.eps = _eps(head.layer.input_layernorm)
        self.heads, self.kv_heads, self.head_dim = core.num_heads, core.num_kv_heads, core.head_dim
        self.scale = core.scale
        self.rotary = core.rotary
        self.cos = self.sin = None  # [positions, D] fp32, grown to the cache's rows

    def rope_table(self, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions 0..rows-1 from the head's own rotary module (fp32). Call it once
        outside a CUDA graph capture (TorchEagleHead.reset does) so that forward only reads it."""
        self.cos, self.sin = grown_rope_table(self.rotary, self.cos, self.sin, rows, device)
        return self.cos, self.sin

    def forward(self, feats, ids, pos, write_at, lengths, ancestors, depths, key, value) -> torch.Tensor:
        """feats [B,T,H] (any strides); ids, pos [B,T] int64 contiguous; write_at, lengths [B] int64;
        ancestors [B,T,T] int32 (entry e: the ancestor at depth e, as a row offset from lengths[b])
        and depths [B,T] int32, as the ordered attention reads them; key/value [B,KVH,rows,D].
        Row t's K/V go to cache row write_at[b] + t; its query sees rows < lengths[b] and rows
        lengths[b] + ancestors[b,t,e], e <= depths[b,t]. Returns predicted features [B*T, H]."""
        batch, tokens = ids.shape
        if uses_triton(self.gemm, batch * tokens):
            return self._forward_triton(feats, ids, pos, write_at, lengths, ancestors, depths, key, value)
        heads, dim, layer = self.heads, self.head_dim, self.layer
        fused_in = torch.cat([F.embedding(ids, self.embed).to(feats.dtype), feats.expand(batch, tokens, -1)], -1)
        residual = F.linear(fused_in, self.fc_weight, self.fc_bias).view(batch * tokens, -1)
        normed = torch.empty_like(residual)
        add_rmsnorm(residual, residual, normed, layer.input_norm, self.eps, add=False)
        cos, sin = self.rope_table(key.shape[2], key.device)
        qkv = F.linear(normed, layer.qkv, layer.qkv_bias)  # [B*T, (H + 2 KVH) * D]
        rope_write(qkv, pos, write_at, cos, sin, key, value, tokens, heads, self.kv_heads)
        q = qkv.view(batch, tokens, -1)[..., :heads * dim].view(batch, tokens, heads, dim).transpose(1, 2)
        out = ordered.ordered_tree_attention(q, key, value, lengths, ancestors, depths, self.scale)
        add_rmsnorm(F.linear(out.view(batch * tokens, heads * dim), layer.o_proj, layer.o_bias),
                    residual, normed, layer.post_norm, self.eps)
        act = silu_mul(F.linear(normed, layer.gate_up, layer.gate_up_bias))
        return residual.add_(F.linear(act, layer.down, layer.down_bias))

    def _forward_triton(self, feats, ids, pos, write_at, lengths, ancestors, depths, key, value) -> torch.Tensor:
        """forward with the Triton GEMMs (module doc): the fc GEMM's partials, then the target's layer
        (fused_decoder.triton_layer) starting from E'[ids] plus them; the stream's second buffer ends as
        the predicted features."""
        batch, tokens = ids.shape
        rows, hidden = batch * tokens, self.fc_feat.shape[0]
        x = feats.expand(batch, tokens, -1).reshape(rows, hidden).contiguous()
        buf = TritonBuffers.for_rows(x.new_empty(rows, hidden), self.layer, self.heads, self.head_dim)
        fc_launch = triton_gemm.LAUNCHES["o"]  # fc has o_proj's shape
        fc_sums = x.new_empty(fc_launch.splits(hidden), rows, hidden, dtype=torch.float32)
        triton_gemm.fused_linear(x, self.fc_feat, None, fc_sums, fc_launch)
        cos, sin = self.rope_table(key.shape[2], key.device)
        layer = self.layer
        rope = triton_gemm.RopeOut(buf.q, layer.qk_rot, layer.qk_rot_bias, pos, write_at, cos, sin, key, value, tokens,
                                   self.heads, self.kv_heads)
        start = triton_gemm.ResidualIn(self.embed_fc, fc_sums, layer.input_norm, buf.stream[0], self.eps, ids)
        triton_layer(layer, start, rope, lengths, ancestors, depths, self.scale, buf)
        # the add of the down GEMM's partials; its RMSNorm output (into stream[0]) goes unused
        add_rmsnorm(buf.mlp_sums, buf.stream[1], buf.stream[0], layer.post_norm, self.eps, pdl=True)
        return buf.stream[1]

    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """lm_head of predicted features [..., H] -> [..., V] in the model dtype (callers take
        log_softmax in fp32: one kernel, no fp32 copy of the logits). With a draft vocabulary the
        head's lm_head holds only its K rows, so this is [..., K] and its positions are mapped back
        by the caller (runtime/drafters/eagle_tree.py, inside the captured draft)."""
        x = predicted.to(self.lm_weight.dtype)
        rows = x.numel() // x.shape[-1]
        if not uses_triton(self.gemm, rows):
            return F.linear(x, self.lm_weight, self.lm_bias)
        return triton_gemm.lm_head(x.reshape(rows, -1).contiguous(), self.lm_weight, self.lm_bias).view(*x.shape[:-1], -1)

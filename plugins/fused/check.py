"""Checks of the fused step's Triton kernels (kernels.py) against PyTorch references, run as a
subprocess by the tests: `python -m treespec.plugins.fused.check --device cpu|cuda` prints one JSON
line of worst errors (relative to each reference's peak). On the CPU it needs TRITON_INTERPRET=1,
set by the caller before Python starts. The tree ancestors must match the torch version exactly.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from treespec.plugins.tree_attention.ordered import tree_ancestors as torch_ancestors
from treespec.plugins.tree_attention.ordered_check import random_tree

from .gemm import (EPI_QKV_ROPE, EPI_SILU_MUL, GemmLaunch, LoopLaunch, ResidualIn, RopeOut, fused_linear, rotated_rows,
                   rows_linear)
from .kernels import add_rmsnorm, rope_write, silu_mul, tree_ancestors


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float().cpu() - ref.float().cpu()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def rms_reference(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm."""
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return w * hf.to(h.dtype)


def check_add_rmsnorm(device, dtype, gen) -> float:
    worst = 0.0
    for rows, width in [(7, 64), (64, 576), (3, 100)]:
        x = torch.randn(rows, width, generator=gen).to(dtype)
        res = torch.randn(rows, width, generator=gen).to(dtype)
        w = (1 + 0.1 * torch.randn(width, generator=gen)).to(dtype)
        r_dev, n_dev = res.clone().to(device), torch.empty(rows, width, dtype=dtype, device=device)
        add_rmsnorm(x.to(device), r_dev, n_dev, w.to(device), 1e-5)
        h = (x.float() + res.float()).to(dtype)
        worst = max(worst, _err(r_dev, h), _err(n_dev, rms_reference(h, w, 1e-5)))
        table = torch.randn(50, width, generator=gen).to(dtype)
        ids = torch.randint(0, 50, (rows,), generator=gen)
        add_rmsnorm(table.to(device), r_dev, n_dev, w.to(device), 1e-5, ids=ids.to(device))
        worst = max(worst, _err(r_dev, table[ids]), _err(n_dev, rms_reference(table[ids], w, 1e-5)))
    return worst


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin



def _rope_write_reference(x, cos, sin, pos, lengths, kc, vc, heads: int, kvh: int):
    """Reference RoPE + cache write: x [B,T,H+2KVH,D] fp32; rotates Q and K, writes K/V rows at
    each sequence's length into kc/vc (their dtype); returns the rotated Q [B,T,H,D]."""
    tokens = x.shape[1]
    c, s = cos[pos][:, :, None], sin[pos][:, :, None]
    q_ref, k_ref = _rotate(x[:, :, :heads], c, s), _rotate(x[:, :, heads:heads + kvh], c, s)
    for b in range(x.shape[0]):
        n = int(lengths[b])
        kc[b, :, n:n + tokens] = k_ref[b].transpose(0, 1).to(kc.dtype)
        vc[b, :, n:n + tokens] = x[b, :, heads + kvh:].transpose(0, 1).to(vc.dtype)
    return q_ref


def check_rope_write(device, dtype, gen) -> float:
    batch, tokens, heads, kvh, dim, rows = 2, 5, 6, 2, 32, 40
    qkv = torch.randn(batch * tokens, (heads + 2 * kvh) * dim, generator=gen).to(dtype)
    pos = torch.randint(0, 30, (batch, tokens), generator=gen)
    lengths = torch.tensor([3, 20])
    angles = torch.arange(rows)[:, None].float() * (0.1 ** torch.arange(dim // 2).float())[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    kc = torch.zeros(batch, kvh, rows, dim, dtype=dtype)
    vc = torch.zeros_like(kc)
    q_dev, kc_dev, vc_dev = qkv.clone().to(device), kc.clone().to(device), vc.clone().to(device)
    rope_write(q_dev, pos.to(device), lengths.to(device), cos.to(device), sin.to(device), kc_dev, vc_dev,
               tokens, heads, kvh)
    x = qkv.float().view(batch, tokens, heads + 2 * kvh, dim)
    q_ref = _rope_write_reference(x, cos, sin, pos, lengths, kc, vc, heads, kvh)
    got_q = q_dev.view(batch, tokens, -1)[..., :heads * dim].reshape(batch, tokens, heads, dim)
    return max(_err(got_q, q_ref), _err(kc_dev, kc), _err(vc_dev, vc))


def check_silu_mul(device, dtype, gen) -> float:
    gate_up = torch.randn(9, 2 * 1536, generator=gen).to(dtype)
    got = silu_mul(gate_up.to(device))
    gate, up = gate_up.chunk(2, -1)
    return _err(got, F.silu(gate.float()) * up.float())


def _launch(split_k: int = 1) -> GemmLaunch:
    return GemmLaunch(block_m=16, block_n=16, split_k=split_k, num_warps=4)


def check_gemm(device, dtype, gen) -> float:
    """The Triton GEMM's three epilogues: split-K partial sums (summed by add_rmsnorm, bias or not, rows
    not a tile multiple), the add+RMSNorm prologue with the residual written out, SiLU*mul."""
    worst = 0.0
    eps = 1e-5
    for rows, k, n, split in [(64, 576, 96, 3), (5, 100, 70, 2), (3, 64, 48, 1)]:
        x = torch.randn(rows, k, generator=gen).to(dtype)
        w = (torch.randn(2 * n, k, generator=gen) / k ** 0.5).to(dtype)
        bias = torch.randn(2 * n, generator=gen).to(dtype)
        xd, wd, bd = x.to(device), w.to(device), bias.to(device)
        for b in (None, bd[:n]):
            sums = torch.empty(split, rows, n, dtype=torch.float32, device=device)
            fused_linear(xd, wd[:n], b, sums, _launch(split))
            ref = (x.float() @ w[:n].float().T + (0 if b is None else bias[:n].float())).to(dtype)
            res = torch.zeros(rows, n, dtype=dtype, device=device)
            normed = torch.empty_like(res)
            add_rmsnorm(sums, res, normed, torch.ones(n, dtype=dtype, device=device), eps)
            worst = max(worst, _err(res, ref))
        # prologue: residual + the partials above, normed, then the SiLU*mul GEMM
        resid = torch.randn(rows, n, generator=gen).to(dtype)
        norm_w = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)
        w_mlp = (torch.randn(2 * k, n, generator=gen) / n ** 0.5).to(dtype)
        out_res = torch.empty(rows, n, dtype=dtype, device=device)
        act = torch.empty(rows, k, dtype=dtype, device=device)
        start = ResidualIn(resid.to(device), sums, norm_w.to(device), out_res, eps)
        fused_linear(start, w_mlp.to(device), None, act, _launch(), EPI_SILU_MUL)
        h = (resid.float() + ref.float()).to(dtype)
        gate_up = (rms_reference(h, norm_w, eps).float() @ w_mlp.float().T).to(dtype).float()
        act_ref = F.silu(gate_up[:, :k]).to(dtype).float() * gate_up[:, k:]
        worst = max(worst, _err(out_res, h), _err(act, act_ref))
    return worst


def check_rows_linear(device, dtype, gen) -> float:
    """The K-loop GEMM (lm_head) against x @ w.T + b, K not a tile multiple, rows not a tile multiple;
    and a row's result the same bits alone and among other rows."""
    worst = 0.0
    for rows, k, n in [(5, 100, 70), (33, 576, 200)]:
        x = torch.randn(rows, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype)
        launch = LoopLaunch(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
        got = rows_linear(x.to(device), w.to(device), bias.to(device), launch)
        worst = max(worst, _err(got, (x.float() @ w.float().T + bias.float()).to(dtype)))
        alone = rows_linear(x[2:3].to(device), w.to(device), bias.to(device), launch)
        worst = max(worst, 0.0 if torch.equal(alone[0], got[2]) else float("inf"))
    return worst


def check_qkv_rope(device, dtype, gen) -> float:
    """The Triton QKV GEMM with the add+RMSNorm prologue (the embedding gather of layer 0 too), RoPE
    and the cache write, with and without bias."""
    batch, tokens, heads, kvh, dim, rows, k = 2, 5, 6, 2, 32, 40, 96
    m, eps = batch * tokens, 1e-5
    resid = torch.randn(m, k, generator=gen).to(dtype)
    sums = torch.randn(2, m, k, generator=gen)
    norm_w = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype)
    table, ids = torch.randn(50, k, generator=gen).to(dtype), torch.randint(0, 50, (m,), generator=gen)
    w = (torch.randn((heads + 2 * kvh) * dim, k, generator=gen) / k ** 0.5).to(dtype)
    pos = torch.randint(0, 30, (batch, tokens), generator=gen)
    lengths = torch.tensor([3, 20])
    angles = torch.arange(rows)[:, None].float() * (0.1 ** torch.arange(dim // 2).float())[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    worst = 0.0
    for bias, gather in [(None, False), (torch.randn(w.shape[0], generator=gen).to(dtype), True)]:
        kc = torch.zeros(batch, kvh, rows, dim, dtype=dtype)
        vc = torch.zeros_like(kc)
        kc_dev, vc_dev = kc.clone().to(device), vc.clone().to(device)
        dev = [t.to(device) if t is not None else None for t in (w, bias, pos, lengths, cos, sin)]
        rot_bias = rotated_rows(dev[1], heads + kvh, dim) if bias is not None else None
        q = torch.empty(m, heads * dim, dtype=dtype, device=device)
        rope = RopeOut(q, rotated_rows(dev[0], heads + kvh, dim), rot_bias, dev[2], dev[3], dev[4], dev[5],
                       kc_dev, vc_dev, tokens, heads, kvh)
        out_res = torch.empty(m, k, dtype=dtype, device=device)
        start = (ResidualIn(table.to(device), None, norm_w.to(device), out_res, eps, ids.to(device)) if gather
                 else ResidualIn(resid.to(device), sums.to(device), norm_w.to(device), out_res, eps))
        fused_linear(start, dev[0], dev[1], q, _launch(), EPI_QKV_ROPE, rope)
        h = table[ids] if gather else (resid.float() + sums.sum(0).to(dtype).float()).to(dtype)
        y = rms_reference(h, norm_w, eps).float() @ w.float().T + (bias.float() if bias is not None else 0)
        y = y.to(dtype).float().view(batch, tokens, heads + 2 * kvh, dim)
        q_ref = _rope_write_reference(y, cos, sin, pos, lengths, kc, vc, heads, kvh)
        worst = max(worst, _err(q.view(batch, tokens, heads, dim), q_ref), _err(kc_dev, kc), _err(vc_dev, vc),
                    _err(out_res, h))
    return worst


def check_ancestors(device, gen) -> bool:
    for tokens, real in [(1, 1), (8, 5), (64, 64), (100, 37), (128, 128)]:
        masks = []
        for _ in range(2):
            mask = torch.eye(tokens, dtype=torch.int64)  # padding rows see themselves only
            mask[:real, :real] = random_tree(real, gen)[1]
            masks.append(mask)
        mask = torch.stack(masks)
        got = tree_ancestors(mask.to(device))
        ref = torch_ancestors(mask != 0)
        if not (torch.equal(got[0].cpu(), ref[0].cpu()) and torch.equal(got[1].cpu(), ref[1].cpu())):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(5)
    result: dict = {"device": args.device, "ancestors_exact": check_ancestors(args.device, gen)}
    for name, dtype in [("float32", torch.float32), ("float16", torch.float16)]:
        result[f"add_rmsnorm_{name}"] = check_add_rmsnorm(args.device, dtype, gen)
        result[f"rope_write_{name}"] = check_rope_write(args.device, dtype, gen)
        result[f"silu_mul_{name}"] = check_silu_mul(args.device, dtype, gen)
        result[f"gemm_{name}"] = check_gemm(args.device, dtype, gen)
        result[f"rows_linear_{name}"] = check_rows_linear(args.device, dtype, gen)
        result[f"qkv_rope_{name}"] = check_qkv_rope(args.device, dtype, gen)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

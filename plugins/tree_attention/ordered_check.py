"""Checks of the position-ordered kernel (ordered.py), run as a subprocess by the tests:
`python -m treespec.plugins.tree_attention.ordered_check --device cpu|cuda` prints one JSON line.

* accuracy: against masked attention in fp32 (PyTorch) on random trees, GQA, several batches;
* step invariance: every node of a random tree, verified in one tree step, gets exactly (bitwise)
  the output that plain decoding gives it: one step per token after its ancestors were committed,
  padded like the torch backend pads a step. The same comparison for SDPA over the buffer is
  reported (not asserted: whether it differs depends on the GPU's kernels).
On the CPU it needs TRITON_INTERPRET=1 (set by the caller before Python starts).
"""
from __future__ import annotations

import argparse
import json

import torch

from .ordered import ordered_tree_attention, tree_ancestors


def random_tree(tokens: int, gen: torch.Generator) -> tuple[list[int], torch.Tensor]:
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, tokens)]
    mask = torch.zeros(tokens, tokens, dtype=torch.bool)
    for i in range(tokens):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return parents, mask


def masked_reference(q, k_cache, v_cache, lengths, mask, scale):
    """fp32 attention of q [B,H,T,D] over committed rows + tree rows under mask [B,T,T]."""
    batch, heads, tokens, dim = q.shape
    groups = heads // k_cache.shape[1]
    out = torch.empty(batch, tokens, heads, dim)
    for b in range(batch):
        n = int(lengths[b])
        k = k_cache[b, :, : n + tokens].float().repeat_interleave(groups, 0)
        v = v_cache[b, :, : n + tokens].float().repeat_interleave(groups, 0)
        visible = torch.cat([torch.ones(tokens, n, dtype=torch.bool), mask[b]], 1)
        s = (q[b].float() @ k.transpose(1, 2)) * scale
        s = s.masked_fill(~visible, float("-inf"))
        out[b] = (torch.softmax(s, -1) @ v).transpose(0, 1)
    return out


def _pad_queries(q_rows, tokens):
    """q_rows [1, H, t, D] zero-padded to `tokens` rows, as the torch backend pads a step."""
    q = q_rows.new_zeros(*q_rows.shape[:2], tokens, q_rows.shape[3])
    q[:, :, :q_rows.shape[2]] = q_rows
    return q


SHAPES = [(1, 9, 3, 17, 64), (3, 8, 2, 64, 32), (2, 4, 4, 5, 16)]  # batch, heads, kv heads, tokens, dim


def accuracy(device, dtype, gen, shapes=SHAPES) -> float:
    worst = 0.0
    for batch, heads, kv_heads, tokens, dim in shapes:
        lengths = torch.randint(0, 150, (batch,), generator=gen)
        rows = int(lengths.max()) + tokens + 3
        k = torch.randn(batch, kv_heads, rows, dim, generator=gen).to(dtype)
        v = torch.randn(batch, kv_heads, rows, dim, generator=gen).to(dtype)
        q = torch.randn(batch, heads, tokens, dim, generator=gen).to(dtype)
        masks = torch.stack([random_tree(tokens, gen)[1] for _ in range(batch)])
        scale = dim ** -0.5
        anc, depth = tree_ancestors(masks.to(device))
        got = ordered_tree_attention(q.to(device), k.to(device), v.to(device), lengths.to(device), anc, depth, scale)
        ref = masked_reference(q, k, v, lengths, masks, scale)
        worst = max(worst, float((got.float().cpu() - ref).abs().max() / ref.abs().max()))
    return worst


def step_invariance(device, dtype, gen, tokens=24, past=70, pad_to=64, dim=64, heads=9, kv_heads=3):
    parents, mask = random_tree(tokens, gen)
    rows = past + pad_to + tokens + 8
    k_past = torch.randn(1, kv_heads, past, dim, generator=gen).to(dtype).to(device)
    v_past = torch.randn(1, kv_heads, past, dim, generator=gen).to(dtype).to(device)
    k_new = torch.randn(1, kv_heads, tokens, dim, generator=gen).to(dtype).to(device)
    v_new = torch.randn(1, kv_heads, tokens, dim, generator=gen).to(dtype).to(device)
    q_new = torch.randn(1, heads, tokens, dim, generator=gen).to(dtype).to(device)
    scale = dim ** -0.5

    def buffer(tail_k, tail_v):
        k = torch.zeros(1, kv_heads, rows, dim, dtype=dtype, device=device)
        v = torch.zeros_like(k)
        k[:, :, :past], v[:, :, :past] = k_past, v_past
        k[:, :, past:past + tail_k.shape[2]], v[:, :, past:past + tail_v.shape[2]] = tail_k, tail_v
        return k, v

    def sdpa(q, k, v, visible):
        qg = q.reshape(1, kv_heads, -1, dim)
        vis = visible.repeat(heads // kv_heads, 1)[None, None]
        out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=vis, scale=scale)
        return out.reshape(1, heads, -1, dim).transpose(1, 2)

    length = torch.tensor([past], device=device)
    q_tree = _pad_queries(q_new, max(pad_to, tokens))
    full_mask = torch.eye(q_tree.shape[2], dtype=torch.bool)
    full_mask[:tokens, :tokens] = mask
    k_tree, v_tree = buffer(k_new, v_new)
    anc, depth = tree_ancestors(full_mask[None].to(device))
    tree_out = ordered_tree_attention(q_tree, k_tree, v_tree, length, anc, depth, scale)
    rows_vis = torch.arange(rows, device=device)
    tree_vis = (rows_vis[None, :] < past) | torch.cat(
        [torch.zeros(q_tree.shape[2], past, dtype=torch.bool), full_mask,
         torch.zeros(q_tree.shape[2], rows - past - q_tree.shape[2], dtype=torch.bool)], 1).to(device)
    tree_sdpa = sdpa(q_tree, k_tree, v_tree, tree_vis)

    same = same_sdpa = 0
    for node in range(tokens):
        path = []
        j = node
        while j >= 0:
            path.append(j)
            j = parents[j]
        path.reverse()  # root .. node: plain decoding commits these one per step
        k_plain, v_plain = buffer(k_new[:, :, path], v_new[:, :, path])
        n = past + len(path) - 1  # the node's position; rows < n are committed
        q_step = _pad_queries(q_new[:, :, [node]], pad_to)
        plain_mask = torch.eye(pad_to, dtype=torch.bool)[None].to(device)
        anc_p, depth_p = tree_ancestors(plain_mask)
        plain = ordered_tree_attention(q_step, k_plain, v_plain, torch.tensor([n], device=device), anc_p, depth_p, scale)
        same += int(torch.equal(plain[0, 0], tree_out[0, node]))
        plain_vis = (rows_vis < n) | (rows_vis == n)
        plain_vis = plain_vis[None].expand(pad_to, rows).clone()
        plain_sdpa = sdpa(q_step, k_plain, v_plain, plain_vis)
        same_sdpa += int(torch.equal(plain_sdpa[0, 0], tree_sdpa[0, node]))
    return {"nodes": tokens, "identical": same, "identical_sdpa": same_sdpa}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trees", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="interpreter-sized cases")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(7)
    result = {"device": args.device}
    shapes = [(1, 9, 3, 7, 64), (2, 4, 2, 12, 16)] if args.small else SHAPES
    tree = {"tokens": 10, "pad_to": 16, "past": 70} if args.small else {}
    for name, dtype in [("float16", torch.float16), ("float32", torch.float32)]:
        result[f"accuracy_{name}"] = accuracy(args.device, dtype, gen, shapes)
        runs = [step_invariance(args.device, dtype, gen, **tree) for _ in range(args.trees)]
        result[f"invariance_{name}"] = {k: sum(r[k] for r in runs) for k in runs[0]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

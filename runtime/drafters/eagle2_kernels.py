"""Triton kernels for the EAGLE-2 draft: top-K children (2 kernels), one kernel per level, one rerank.

Why: in the captured draft each kernel costs a few microseconds whatever it does, and the
bookkeeping in PyTorch ops (cumulative scores, top-K of the K^2 children, gathers of tokens,
features and ancestor lists; then a stable sort, a second sort, scatters and gathers for the
rerank) was ~45 of a draft's ~150 kernels for tensors of a few hundred numbers, and on CUDA
torch.topk over a 49k vocabulary is a ~19-kernel radix select (6 of them: 114 of the fp16 draft's
223 kernels on the H200). Each program here
owns one sequence and selects by rank: candidate i ranks before j when its score is higher, or
equal with a smaller index (a stable order: on equal scores a parent, drafted earlier, comes
first). The rerank keeps exactly the N + 1 of rank <= N (the root, ext id 0, has score 0 >= every
log-probability, so rank 0), which is what a stable descending sort followed by the first N + 1
gives. NaN scores or logits (garbage in) rank last, so no selection indexes out of range.
Candidates are in runtime/drafters/eagle_tree.py's ext order. Must stay in a .py file:
Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) reads the source.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def expand_level_kernel(SCORES, CHILD_LP, CHILD_TOK, FEAT, ANC, ANC_STEP,
                        ALL_SCORES, ALL_TOKENS, EXPANDED, BEST, TOKENS, FEATS, ANC_OUT,
                        H, C1, E1, cand_offset, slot_offset,
                        K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KK: tl.constexpr, BLOCK_H: tl.constexpr,
                        EXPAND: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_KK)  # this level's candidates: child c of expanded node j is j * K + c
    ok = i < K * K
    cum = tl.load(SCORES + b * K + i // K, mask=ok, other=0.0) + tl.load(CHILD_LP + b * K * K + i, mask=ok, other=0.0)
    cum = tl.where(cum == cum, cum, float("-inf"))  # NaN: no rank, so no pick out of range
    tok = tl.load(CHILD_TOK + b * K * K + i, mask=ok, other=0)
    tl.store(ALL_SCORES + b * C1 + cand_offset + i, cum, mask=ok)
    tl.store(ALL_TOKENS + b * C1 + cand_offset + i, tok, mask=ok)
    if EXPAND:  # the K best children become the next level's expanded nodes, best first
        beats = (cum[None, :] > cum[:, None]) | ((cum[None, :] == cum[:, None]) & (i[None, :] < i[:, None]))
        rank = tl.sum((beats & ok[None, :]).to(tl.int32), axis=1)
        r = tl.arange(0, BLOCK_K)
        r_ok = r < K
        sel = (rank[None, :] == r[:, None]) & ok[None, :]  # [slot r, candidate i]
        pick = tl.sum(tl.where(sel, i[None, :], 0), axis=1)
        tl.store(BEST + b * K + r, tl.sum(tl.where(sel, cum[None, :], 0.0), axis=1), mask=r_ok)
        tl.store(TOKENS + b * K + r, tl.load(CHILD_TOK + b * K * K + pick, mask=r_ok, other=0), mask=r_ok)
        tl.store(EXPANDED + b * E1 + slot_offset + r, cand_offset + pick, mask=r_ok)
        parent = (b * K + pick // K).to(tl.int64)
        for start in range(0, H, BLOCK_H):
            h = start + tl.arange(0, BLOCK_H)
            both = r_ok[:, None] & (h < H)[None, :]
            f = tl.load(FEAT + parent[:, None] * H + h[None, :], mask=both, other=0.0)
            tl.store(FEATS + (b * K + r)[:, None] * H + h[None, :], f, mask=both)
        col = tl.arange(0, BLOCK_K)
        cell = r_ok[:, None] & (col < K)[None, :]
        anc = tl.load(ANC + parent[:, None] * K + col[None, :], mask=cell, other=0)
        step = tl.load(ANC_STEP + r[:, None] * K + col[None, :], mask=cell, other=0)
        tl.store(ANC_OUT + (b * K + r)[:, None] * K + col[None, :], anc + step, mask=cell)


@triton.jit
def rerank_kernel(SCORES, TOKENS, EXPANDED, PARENT_SLOT, NODE_OF, PACKED, C1, E1, N,
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < C1
    s = tl.load(SCORES + b * C1 + i, mask=ok, other=0.0)
    s = tl.where(s == s, s, float("-inf"))  # NaN ranks last (else several rank 0: writes past the row)
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, C1, CHUNK):
        j = start + tl.arange(0, CHUNK)
        s_j = tl.load(SCORES + b * C1 + j, mask=j < C1, other=0.0)
        s_j = tl.where(s_j == s_j, s_j, float("-inf"))
        beats = (s_j[None, :] > s[:, None]) | ((s_j[None, :] == s[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((beats & (j < C1)[None, :]).to(tl.int32), axis=1)
    kept = ok & (rank <= N)
    node = tl.cumsum(kept.to(tl.int32), axis=0) - 1  # kept candidates numbered in ext order: parents first
    tl.store(NODE_OF + b * C1 + i, node, mask=ok)
    tl.debug_barrier()
    parent = tl.load(EXPANDED + b * E1 + tl.load(PARENT_SLOT + i, mask=ok, other=0), mask=kept, other=0)
    out = kept & (i > 0)
    dst = PACKED + b * 3 * N + node - 1
    tl.store(dst, tl.load(TOKENS + b * C1 + i, mask=out, other=0).to(tl.float32), mask=out)
    tl.store(dst + N, tl.load(NODE_OF + b * C1 + parent, mask=out, other=0).to(tl.float32), mask=out)
    tl.store(dst + 2 * N, s - tl.load(SCORES + b * C1 + parent, mask=out, other=0.0), mask=out)


@triton.jit
def chunk_topk_kernel(LOGITS, VALUES, INDICES, MAXES, SUMS, V, S, K: tl.constexpr, BLOCK_K: tl.constexpr,
                      CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ok = offs < V
    x = tl.load(LOGITS + row * V + offs, mask=ok, other=float("-inf")).to(tl.float32)
    x = tl.where(x == x, x, float("-inf"))  # NaN: never the argmax (which could then be a padded lane)
    m = tl.max(x, axis=0)
    out = (row * S + chunk) * K
    tl.store(MAXES + row * S + chunk, m)
    tl.store(SUMS + row * S + chunk, tl.sum(tl.where(ok, tl.exp(x - m), 0.0), axis=0))
    for r in tl.static_range(K):  # the chunk's K largest, ties to the smaller index
        best = tl.argmax(x, axis=0, tie_break_left=True)
        tl.store(VALUES + out + r, tl.max(x, axis=0))
        tl.store(INDICES + out + r, chunk * CHUNK + best)
        x = tl.where(tl.arange(0, CHUNK) == best, float("-inf"), x)


@triton.jit
def merge_topk_kernel(VALUES, INDICES, MAXES, SUMS, LOGPROBS, TOKENS, S, K: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_S)
    m = tl.load(MAXES + row * S + c, mask=c < S, other=float("-inf"))
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(tl.load(SUMS + row * S + c, mask=c < S, other=0.0) * tl.exp(m - top), axis=0))
    j = tl.arange(0, BLOCK)  # candidates chunk-major, each chunk's best first: leftmost = smaller index
    x = tl.load(VALUES + row * S * K + j, mask=j < S * K, other=float("-inf"))
    for r in tl.static_range(K):
        best = tl.argmax(x, axis=0, tie_break_left=True)
        tl.store(LOGPROBS + row * K + r, tl.max(x, axis=0) - lse)
        tl.store(TOKENS + row * K + r, tl.load(INDICES + row * S * K + best).to(tl.int64))
        x = tl.where(j == best, float("-inf"), x)


def top_children(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs fp32, tokens int64) [..., k] of the k largest logits of each row [..., V], best
    first (ties: the smaller token id), log-probs against the row's logsumexp: what
    topk(log_softmax(logits)) gives, in two kernels (torch.topk over a 49k vocabulary on CUDA is a
    ~19-kernel radix select)."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    n = rows.shape[0]
    chunk = 2048
    s = triton.cdiv(vocab, chunk)
    values = torch.empty(n, s, k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(n, s, k, dtype=torch.int32, device=logits.device)
    maxes = torch.empty(n, s, dtype=torch.float32, device=logits.device)
    sums = torch.empty_like(maxes)
    chunk_topk_kernel[(n, s)](rows, values, indices, maxes, sums, vocab, s, K=k, BLOCK_K=triton.next_power_of_2(k),
                              CHUNK=chunk, num_warps=4)
    logprobs = torch.empty(*lead, k, dtype=torch.float32, device=logits.device)
    tokens = torch.empty(*lead, k, dtype=torch.int64, device=logits.device)
    merge_topk_kernel[(n,)](values, indices, maxes, sums, logprobs, tokens, s, K=k,
                            BLOCK_S=triton.next_power_of_2(s), BLOCK=triton.next_power_of_2(s * k),
                            num_warps=1)  # H200, d6-k8-n64 draft: 0.487 ms replayed (4 warps: 0.504)
    return logprobs, tokens


def expand_level(scores, child_lp, child_tok, feat, anc, anc_step, all_scores, all_tokens, expanded,
                 cand_offset: int, slot_offset: int, expand: bool):
    """Record one level's K^2 candidates (cumulative scores, tokens) at ext ids cand_offset...;
    with `expand`, also select the K best: returns (their scores [B,K], tokens [B,K], the features
    of their parents [B,K,H], their ancestor lists [B,K,K] int32) and writes their ext ids."""
    batch, k = scores.shape
    hidden = feat.shape[-1]
    outs = (torch.empty_like(scores), torch.empty_like(child_tok[:, 0]), torch.empty_like(feat), torch.empty_like(anc)) \
        if expand else (scores,) * 4
    expand_level_kernel[(batch,)](scores, child_lp, child_tok, feat, anc, anc_step, all_scores, all_tokens, expanded,
                                  *outs, hidden, all_scores.shape[1], expanded.shape[1], cand_offset, slot_offset,
                                  K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK_KK=triton.next_power_of_2(k * k),
                                  BLOCK_H=min(1024, triton.next_power_of_2(hidden)), EXPAND=expand, num_warps=4)
    return outs


def rerank(all_scores, all_tokens, expanded, parent_slot, node_of, kept: int) -> torch.Tensor:
    """packed [B, 3N] float32: tokens, parent node indices, own log-probs of the N kept nodes."""
    batch, c1 = all_scores.shape
    packed = torch.empty(batch, 3 * kept, dtype=torch.float32, device=all_scores.device)
    rerank_kernel[(batch,)](all_scores, all_tokens, expanded, parent_slot, node_of, packed, c1, expanded.shape[1],
                            kept, BLOCK=triton.next_power_of_2(c1), CHUNK=32, num_warps=8)
    return packed


@triton.jit
def tree_of_kernel(PACKED, ROOTS, IDS, DEPTHS, MASK, N, N1, DEPTH: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    j = tl.arange(0, BLOCK)
    ok = i < N1
    row = PACKED + b * 3 * N
    token = tl.load(row + i - 1, mask=ok & (i > 0), other=0.0).to(tl.int64)
    tl.store(IDS + b * N1 + i, tl.where(i == 0, tl.load(ROOTS + b), token), mask=ok)
    cur = i
    depth = tl.zeros([BLOCK], dtype=tl.int64)
    anc = j[None, :] == i[:, None]
    for _ in tl.static_range(DEPTH):  # up one level a pass: the root (node 0) is its own parent
        depth += (cur > 0).to(tl.int64)
        cur = tl.load(row + N + cur - 1, mask=ok & (cur > 0), other=0.0).to(tl.int32)
        anc = anc | (j[None, :] == cur[:, None])
    tl.store(DEPTHS + b * N1 + i, depth, mask=ok)
    cell = ok[:, None] & (j < N1)[None, :]
    tl.store(MASK + (b * N1 + i)[:, None] * N1 + j[None, :], anc.to(tl.int8), mask=cell)


def tree_of(packed: torch.Tensor, roots: torch.Tensor, depth: int):
    """(ids [B, N+1] int64, depths [B, N+1] int64, mask [B, N+1, N+1] bool) of the reranked trees in
    `packed` (rerank's output) under `roots` [B]: what the target verifies, made in one launch."""
    batch, n = packed.shape[0], packed.shape[1] // 3
    ids = torch.empty(batch, n + 1, dtype=torch.int64, device=packed.device)
    depths = torch.empty_like(ids)
    mask = torch.empty(batch, n + 1, n + 1, dtype=torch.bool, device=packed.device)
    tree_of_kernel[(batch,)](packed, roots, ids, depths, mask.view(torch.int8), n, n + 1, DEPTH=depth,
                             BLOCK=triton.next_power_of_2(n + 1), num_warps=4)
    return ids, depths, mask

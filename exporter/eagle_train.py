"""Training the EAGLE head by self-distillation, with EAGLE-3's training-time test, and measuring it.

Why this shape: features are never stored (0.6M floats per 1k tokens would not come back from the
GPU machine); the frozen target recomputes them from the stored token ids in every batch, which
costs about one target forward, far less than the head's lm_head work. The loss at unroll step k
(the head fed its own feature predicted at step k-1, eagle.EagleHead.unroll) is
    0.8^(k-1) * (smooth-L1(predicted feature, target feature) + w * CE(target's p, head's q))
with p the target's own next-token distribution (soft labels, as EAGLE). A second head trained
with a different unroll depth in the same loop (sharing the target's forward) measures whether
training-time test raises acceptance; the better one on held-out prompts is kept.

Measured per head, on held-out prompts and the bench prompts' target answers (answer positions
only; a draft row at position t has the target's feature at t and token t+1, and drafts t+2...):
top-1 at unroll steps 1..6 (each given a correct prefix, as Medusa reports per head), tokens per
verify step for a chain of 6 (exact per position), for a full top-4 tree of depth 6 (exact, an
upper bound) and for the best static 64-node tree of depth <= 6 built from the measured
rank-acceptance rates (an estimate in the manner of Sequoia; a dynamic EAGLE-2 tree does better).

Heads train and are measured over the full vocabulary; the kept head is saved with a draft
vocabulary of the dataset's most frequent answer tokens when one is asked for (exporter/eagle_vocab.py),
and `run_vocab_only` gives an existing head one without training (the lm_head is the target's
frozen one, so a subset is just rows of it).
"""
from __future__ import annotations

import heapq
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from treespec.exporter import eagle_data, eagle_vocab
from treespec.exporter.eagle_data import SPLIT_BENCH, SPLIT_HELDOUT, SPLIT_TRAIN, DataOptions, TokenData
from treespec.models.checkpoint import load_checkpoint
from treespec.models.drafter_models import load_weights
from treespec.models.eagle import EagleHead, eagle_from_weights, eagle_metadata, save_eagle
from treespec.models.tree_model import TreeDecoder

RANKS = 10  # rank-acceptance rates kept per step for the tree estimate
EVAL_RESERVE_S = 45.0  # of a whole-run time budget, kept for evaluation and saving


@dataclass
class TrainConfig:
    epochs: float = 2.0
    token_batch: int = 16384  # padded tokens per batch
    max_length: int = 640
    lr: float = 3e-4
    warmup: int = 100
    unroll: int = 4  # training-time test depth of the kept head (1 = plain EAGLE-1 training)
    compare_unroll: int = 1  # a second head trained alongside with this depth (0: none)
    ce_weight: float = 0.5
    step_decay: float = 0.8
    time_budget: float = 0.0  # seconds for the training loop; the LR decays over it and stops there (0: none)
    seed: int = 0
    log_every: int = 50


def batches(lengths: np.ndarray, indices: np.ndarray, token_batch: int, max_length: int,
            rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches of similar lengths (shuffled in pools of 64 batches), each holding at
    most token_batch padded tokens."""
    order = rng.permutation(indices)
    out = []
    pool = 64 * max(1, token_batch // max_length)
    for s in range(0, len(order), pool):
        chunk = order[s:s + pool]
        chunk = chunk[np.argsort(np.minimum(lengths[chunk], max_length), kind="stable")]
        start = 0
        while start < len(chunk):  # sorted: a batch's width is its last sequence's length
            count = 1
            while start + count < len(chunk) and (count + 1) * min(int(lengths[chunk[start + count]]),
                                                                    max_length) <= token_batch:
                count += 1
            out.append(chunk[start:start + count])
            start += count
    return [out[i] for i in rng.permutation(len(out))]


def tensors(data: TokenData, rows: np.ndarray, max_length: int, device: str):
    """ids [B,L] int64 (right padded), valid [B,L] bool, prompt lengths [B]."""
    lengths = np.minimum(data.lengths()[rows], max_length)
    ids = np.zeros((len(rows), int(lengths.max())), np.int64)
    for r, i in enumerate(rows):
        ids[r, :lengths[r]] = data.sequence(int(i))[:lengths[r]]
    valid = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    return (torch.from_numpy(ids).to(device), torch.from_numpy(valid).to(device),
            torch.from_numpy(data.prompt_lengths[rows].astype(np.int64)).to(device))


@torch.no_grad()
def target_features(target, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The target's final post-norm hidden states [B,L,H] (fp32), what TreeDecoder returns."""
    out = target.model(input_ids=ids, attention_mask=valid.long())
    return out.last_hidden_state.float()


@torch.no_grad()
def target_probs(head: EagleHead, feats: torch.Tensor, valid: torch.Tensor, autocast) -> torch.Tensor:
    """The target's next-token distribution at positions 1.. of every valid row: [N,V] fp32."""
    with autocast():
        return torch.softmax(head.logits(feats[:, 1:][valid[:, 1:]]), dim=-1)


def unroll_loss(head: EagleHead, feats, ids, valid, target_p, steps: int, cfg: TrainConfig, autocast) -> tuple:
    """Training-time-test loss over `steps` unroll steps -> (loss, top-1 per step)."""
    rows_ok = valid[:, 1:]  # row i targets position i+1
    with autocast():
        outs = head.unroll(feats, ids, steps)
    row = torch.arange(rows_ok.shape[1], device=ids.device)
    total, top1 = 0.0, []
    for k, out in enumerate(outs, start=1):
        mask = rows_ok & (row >= k - 1)[None, :]
        p = target_p[mask[rows_ok]]
        with autocast():
            logits = head.logits(out[mask])
        ce = F.cross_entropy(logits, p)  # soft labels: the target's own distribution
        reg = F.smooth_l1_loss(out[mask].float(), feats[:, 1:][mask])
        total = total + cfg.step_decay ** (k - 1) * (reg + cfg.ce_weight * ce)
        top1.append(float((logits.argmax(-1) == p.argmax(-1)).float().mean()))
    return total / sum(cfg.step_decay ** k for k in range(steps)), top1


@dataclass
class Trainee:
    head: EagleHead
    unroll: int
    optimizer: torch.optim.Optimizer
    losses: list


def _autocast(device: str):
    if device == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def train_heads(target, heads: list[tuple[EagleHead, int]], data: TokenData, cfg: TrainConfig, device: str,
                log=print) -> dict:
    """Train every (head, unroll depth) on the train split; the target's forward is shared."""
    rng = np.random.default_rng(cfg.seed)
    lengths, train = data.lengths(), data.select(SPLIT_TRAIN)
    plan = []
    for _ in range(max(1, math.ceil(cfg.epochs))):
        plan += batches(lengths, train, cfg.token_batch, cfg.max_length, rng)
    plan = plan[:max(1, round(len(plan) * cfg.epochs / max(1, math.ceil(cfg.epochs))))]
    trainees = [Trainee(h, k, torch.optim.AdamW(h.trainable_parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                                weight_decay=0.0), []) for h, k in heads]
    autocast, started, step = _autocast(device), time.perf_counter(), 0
    for step, rows in enumerate(plan):
        elapsed = time.perf_counter() - started
        done = max(step / len(plan), elapsed / cfg.time_budget if cfg.time_budget else 0.0)  # a budget ends the decay
        scale = min(1.0, (step + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))
        ids, valid, _ = tensors(data, rows, cfg.max_length, device)
        feats = target_features(target, ids, valid)
        target_p = target_probs(trainees[0].head, feats, valid, autocast)
        for t in trainees:
            for group in t.optimizer.param_groups:
                group["lr"] = cfg.lr * scale
            loss, top1 = unroll_loss(t.head, feats, ids, valid, target_p, t.unroll, cfg, autocast)
            t.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(t.head.trainable_parameters(), 1.0)
            t.optimizer.step()
            t.losses.append((float(loss.detach()), top1))
        elapsed = time.perf_counter() - started
        if step % cfg.log_every == 0 or step == len(plan) - 1:
            log(f"step {step + 1}/{len(plan)} {elapsed:.0f}s " + " | ".join(
                f"unroll {t.unroll}: loss {t.losses[-1][0]:.3f} top1 " + " ".join(f"{a:.2f}" for a in t.losses[-1][1])
                for t in trainees))
        if cfg.time_budget and elapsed > cfg.time_budget:
            log(f"time budget spent after {step + 1} of {len(plan)} steps")
            break
    tokens = int(sum(lengths[r].clip(max=cfg.max_length).sum() for r in plan[:step + 1]))
    return {"steps": step + 1, "planned_steps": len(plan), "train_seconds": round(time.perf_counter() - started, 1),
            "tokens_seen": tokens, "heads": [_loss_summary(t) for t in trainees]}


def _loss_summary(t: Trainee) -> dict:
    window = max(1, min(20, len(t.losses) // 4))
    return {"unroll": t.unroll, "first_loss": float(np.mean([l for l, _ in t.losses[:window]])),
            "final_loss": float(np.mean([l for l, _ in t.losses[-window:]]))}


@torch.no_grad()
def evaluate(target, head: EagleHead, data: TokenData, split: int, device: str, steps: int = 6,
             max_length: int = 640, batch: int = 16) -> dict:
    """Per-step top-1, rank-acceptance rates and simulated tokens per verify step on `split`
    (answer positions only)."""
    autocast = _autocast(device)
    rows = data.select(split)
    hits = np.zeros(steps)
    counts = np.zeros(steps)
    ranks = np.zeros((steps, RANKS))
    chain, top4 = [], []
    for s in range(0, len(rows), batch):
        ids, valid, prompt = tensors(data, rows[s:s + batch], max_length, device)
        feats = target_features(target, ids, valid)
        with autocast():
            outs = head.unroll(feats, ids, steps)
        want = head.logits(feats[:, 1:]).argmax(-1)  # [B,T] the target's token at position i+2
        tokens = want.shape[1]
        row = torch.arange(tokens, device=ids.device)
        answer = (row[None, :] >= prompt[:, None] - 1) & valid[:, 1:]
        rank = torch.stack([_rank_of(head.logits(o), want) for o in outs])  # [K,B,T]
        for k in range(steps):
            mask = answer & (row >= k)[None, :]
            r = rank[k][mask]
            hits[k] += float((r == 0).sum())
            counts[k] += float(mask.sum())
            ranks[k] += torch.bincount(r.clamp(max=RANKS), minlength=RANKS + 1)[:RANKS].cpu().numpy()
        full = answer & F.pad(valid[:, 1 + steps:], (0, steps), value=False)  # origins with all steps
        # origin o: step k is row o+k-1, so shift each step's ranks back by k-1
        lead = torch.stack([F.pad(rank[k][:, k:], (0, k), value=RANKS) for k in range(steps)], dim=-1)
        chain.append(_leading(lead == 0)[full].cpu())
        top4.append(_leading(lead < 4)[full].cpu())
    rates = ranks / np.maximum(counts[:, None], 1)
    return {"sequences": int(len(rows)), "positions": int(counts[0]),
            "top1": [round(float(x), 4) for x in hits / np.maximum(counts, 1)],
            "tokens_per_step_chain6": round(1 + float(torch.cat(chain).float().mean()), 3),
            "tokens_per_step_top4_tree6": round(1 + float(torch.cat(top4).float().mean()), 3),
            "tokens_per_step_tree64_estimate": round(1 + tree_estimate(rates, 64), 3),
            "rank_rates": [[round(float(x), 4) for x in r] for r in rates]}


def _rank_of(logits: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Rank (0 = top) of token `want` in each row's logits."""
    mine = logits.gather(-1, want[..., None])
    return (logits > mine).sum(-1)


def _leading(ok: torch.Tensor) -> torch.Tensor:
    """[..., K] bool -> how many leading steps are True."""
    return ok.int().cumprod(-1).sum(-1)


def tree_estimate(rates: np.ndarray, nodes: int) -> float:
    """Expected accepted drafts of the best static tree of `nodes` nodes, depth <= len(rates),
    when the child of rank r at depth d is accepted with probability rates[d][r] given its parent
    was (best-first: a node's value is the product along its path, never above its parent's)."""
    heap = [(-rates[0][r], 0, r) for r in range(rates.shape[1])]
    heapq.heapify(heap)
    total = 0.0
    for _ in range(nodes):
        if not heap:
            break
        neg, depth, _ = heapq.heappop(heap)
        total -= neg
        if depth + 1 < len(rates):
            for r in range(rates.shape[1]):
                heapq.heappush(heap, (neg * rates[depth + 1][r], depth + 1, r))
    return total


def evaluate_all(target, head: EagleHead, data: TokenData, device: str, max_length: int) -> dict:
    return {"heldout": evaluate(target, head, data, SPLIT_HELDOUT, device, max_length=max_length),
            "bench": evaluate(target, head, data, SPLIT_BENCH, device, max_length=max_length)}


@dataclass
class EagleOptions:
    out: Path
    data_dir: Path
    model: str = "smollm2-135m"
    device: str = "cpu"
    rebuild_data: bool = False
    time_budget: float = 0.0  # seconds for the whole run (data, training, evaluation); 0: none
    init: Path | None = None  # head weights to start from (a run continued), else the identity-like head
    extra_data: tuple[Path, ...] = ()  # datasets of other runs whose training rows are added
    data_only: bool = False  # build (or check) the dataset, then stop
    draft_vocab: int = 0  # K: save the head with the K most frequent answer tokens as its draft vocabulary (0: none)
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainConfig = field(default_factory=TrainConfig)


def dataset(opts: EagleOptions, target, tokenizer, log=print) -> tuple[TokenData, dict]:
    """The stored dataset in opts.data_dir, built by the target first when missing."""
    if (opts.data_dir / "index.npz").is_file() and not opts.rebuild_data:
        data = eagle_data.load(opts.data_dir)
        meta_file = opts.data_dir / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        log(f"reusing dataset {opts.data_dir}: {len(data.offsets) - 1} sequences, {len(data.ids)} tokens")
        return data, meta
    started = time.perf_counter()
    data, meta = eagle_data.build_dataset(TreeDecoder(target), tokenizer, opts.data, log)
    meta["build_seconds"] = round(time.perf_counter() - started, 1)
    eagle_data.save(data, opts.data_dir, meta)
    log(f"dataset: {meta}")
    return data, meta


def training_data(opts: EagleOptions, target, tokenizer, log=print) -> tuple[TokenData, dict]:
    """The run's dataset plus the training rows of opts.extra_data."""
    data, meta = dataset(opts, target, tokenizer, log)
    if opts.extra_data:
        data, dropped = eagle_data.with_extra(data, [eagle_data.load(d) for d in opts.extra_data])
        meta = {**meta, "extra_data": [str(d) for d in opts.extra_data], "extra_dropped_as_unseen": dropped,
                "train_tokens": int(data.lengths()[data.splits == SPLIT_TRAIN].sum()), "tokens": int(len(data.ids))}
        log(f"with {len(opts.extra_data)} extra dataset(s): {meta['train_tokens']} training tokens "
            f"({dropped} extra sequences dropped: their prompts are held out here)")
    return data, meta


def run_training(opts: EagleOptions, log=print) -> dict:
    """Load the target, make or reuse the data, train the head(s), measure, save the best."""
    cfg, started = opts.train, time.perf_counter()
    torch.manual_seed(cfg.seed)
    ckpt = load_checkpoint(opts.model)
    target = ckpt.model.to(opts.device).eval().requires_grad_(False)
    depths = [cfg.unroll] + ([cfg.compare_unroll] if cfg.compare_unroll else [])
    heads = [(eagle_from_weights(target, opts.init, draft_vocab=False).to(opts.device), k)
             for k in depths]  # fp32 layer copies, trained over the full vocabulary
    if opts.device == "cuda":
        torch.nn.Module.half(target)  # the runtime precision (HF refuses .half() on GGUF models); heads stay fp32
    data, data_meta = training_data(opts, target, ckpt.tokenizer, log)
    if opts.data_only:
        return {"model": opts.model, "data": data_meta}
    if opts.time_budget:  # what the whole run has left, less a reserve for evaluation and saving
        left = opts.time_budget - (time.perf_counter() - started) - EVAL_RESERVE_S
        cfg = replace(cfg, time_budget=max(1.0, left))
        log(f"training budget: {cfg.time_budget:.0f} s")
    training = train_heads(target, heads, data, cfg, opts.device, log)
    evals = [evaluate_all(target, h, data, opts.device, cfg.max_length) for h, _ in heads]
    for (_, k), e in zip(heads, evals):
        log(f"unroll {k}: " + json.dumps({s: {m: e[s][m] for m in e[s] if m != "rank_rates"} for s in e}))
    best = max(range(len(heads)), key=lambda i: evals[i]["heldout"]["tokens_per_step_tree64_estimate"])
    summary = {"model": opts.model, "data": data_meta, "train": {**asdict(cfg), **training,
                                                                  "init": opts.init.name if opts.init else None},
               "eval": {f"unroll{k}": e for (_, k), e in zip(heads, evals)}, "kept_unroll": heads[best][1]}
    extra = {"unroll": str(heads[best][1])}
    if opts.draft_vocab:
        summary["draft_vocab"] = attach_draft_vocab(heads[best][0], data, opts.draft_vocab, ckpt.tokenizer, log)
        extra["draft_vocab_stats"] = json.dumps(summary["draft_vocab"])
    save_eagle(heads[best][0], opts.out, eagle_metadata(target.config, {**extra, "summary": json.dumps(summary)}))
    log(f"wrote {opts.out} (the head trained with unroll {heads[best][1]})")
    return summary


def attach_draft_vocab(head: EagleHead, data: TokenData, k: int, tokenizer, log=print) -> dict:
    """Give `head` the draft vocabulary of `data`'s k most frequent answer tokens; its stats."""
    ids, stats = eagle_vocab.build_draft_vocab(data, k, head.vocab_size, tokenizer.eos_token_id,
                                               tokenizer.all_special_ids)
    head.use_draft_vocab(torch.from_numpy(ids))
    log(f"draft vocabulary: {json.dumps(stats)}")
    return stats


def run_vocab_only(opts: EagleOptions, log=print) -> dict:
    """The head in opts.init, unchanged, with a draft vocabulary of opts.draft_vocab ids built from
    the stored dataset (plus opts.extra_data): no training. Its metadata is kept."""
    ckpt = load_checkpoint(opts.model)
    target = ckpt.model.eval().requires_grad_(False)
    head = eagle_from_weights(target, opts.init, draft_vocab=False)  # a vocabulary it had is replaced
    data, data_meta = training_data(opts, target, ckpt.tokenizer, log)
    stats = attach_draft_vocab(head, data, opts.draft_vocab, ckpt.tokenizer, log)
    save_eagle(head, opts.out, {**load_weights(opts.init)[1], "draft_vocab_stats": json.dumps(stats)})
    log(f"wrote {opts.out}: {opts.init} with a draft vocabulary of {stats['size']} ids")
    return {"model": opts.model, "data": data_meta, "init": str(opts.init), "draft_vocab": stats}

"""`treespec train-medusa` / `treespec train-draft`: self-distillation of a drafter.

Labels are the target's greedy predictions at every position. Checkpoints (weights, optimizer
state, step) are safetensors, training resumes from them, and batches depend only on (seed, step)
so that a resumed run reproduces an uninterrupted one.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F
from tqdm import tqdm

from treespec.exporter import distill_data as data
from treespec.models.checkpoint import load_checkpoint
from treespec.models.drafter_models import (MedusaHeads, draft_trainable_state, make_draft_model,
                                              save_weights)


@dataclass
class TrainOptions:
    kind: str  # "medusa" or "draft"
    model: str = "smollm2-135m"
    out: Path = Path("drafter.safetensors")
    corpus: list[Path] = field(default_factory=list)
    corpus_bytes: int = 20_000_000
    sequences: int = 2048  # prompts the target answers (self-generated data)
    corpus_windows: int = 0  # extra plain-text windows (teacher-forced)
    new_tokens: int = 192
    max_prompt_tokens: int = 160
    generate_batch: int = 128
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    num_heads: int = 4
    num_layers: int = 2
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 100
    resume: bool = True
    dataset: Path | None = None  # share one generated dataset between drafters


def _paths(out: Path) -> tuple[Path, Path]:
    stem = out.with_suffix("")
    return stem.with_name(stem.name + ".dataset.safetensors"), stem.with_name(stem.name + ".ckpt.safetensors")


def build_dataset(opts: TrainOptions, target, tokenizer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from safetensors.torch import load_file, save_file

    dataset_path = opts.dataset or _paths(opts.out)[0]
    if dataset_path.exists() and (opts.resume or opts.dataset):
        saved = load_file(str(dataset_path))
        data.log(f"reusing dataset {dataset_path} ({saved['ids'].shape[0]} sequences)")
        return saved["ids"], saved["lengths"], {}
    texts = data.read_corpus(opts.corpus or data.default_corpus_dirs(), opts.corpus_bytes, opts.seed)
    info = {"corpus_files": len(texts), "corpus_chars": sum(len(t) for t in texts)}
    data.log(f"corpus: {info['corpus_files']} files, {info['corpus_chars'] / 1e6:.1f} M characters")
    sequences = []
    if opts.sequences:
        prompts = data.make_prompts(texts, opts.sequences, opts.seed)
        with tqdm(total=len(prompts), desc="target answers prompts", unit="seq") as bar:
            sequences += data.generate_sequences(target, tokenizer, prompts, opts.new_tokens, opts.generate_batch,
                                                 opts.max_prompt_tokens, opts.device, bar.update)
    if opts.corpus_windows:
        sequences += data.corpus_sequences(tokenizer, texts, opts.corpus_windows,
                                           opts.max_prompt_tokens + opts.new_tokens, opts.seed)
    ids, lengths = data.pack(sequences, tokenizer.pad_token_id or 0)
    dataset_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"ids": ids, "lengths": lengths}, str(dataset_path))
    info["tokens"] = int(lengths.sum())
    return ids, lengths, info


def _batch(ids, lengths, opts: TrainOptions, step: int):
    gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + step)
    rows = torch.randint(0, ids.shape[0], (opts.batch_size,), generator=gen)
    width = int(lengths[rows].max())
    batch = ids[rows, :width].long().to(opts.device)
    valid = (torch.arange(width)[None, :] < lengths[rows][:, None]).to(opts.device)
    return batch, valid


def medusa_loss(heads: MedusaHeads, hidden, labels, valid) -> torch.Tensor:
    logits = heads.head_logits(hidden.float())  # [B,L,K,V]
    total, weight_sum = 0.0, 0.0
    for k in range(heads.num_heads):
        shift = k + 1  # head k at position t predicts the target's prediction at t + k + 1
        if labels.shape[1] <= shift:
            break
        pred = logits[:, :-shift, k]
        want = labels[:, shift:]
        mask = valid[:, shift:]
        loss = F.cross_entropy(pred[mask].float(), want[mask])
        weight = 0.8 ** k
        total, weight_sum = total + weight * loss, weight_sum + weight
    return total / weight_sum


def draft_loss(draft, batch, labels, valid) -> torch.Tensor:
    logits = draft(input_ids=batch, attention_mask=valid.long()).logits
    return F.cross_entropy(logits[valid].float(), labels[valid])


def _save_checkpoint(path: Path, module_state: dict, optimizer, step: int, losses: list[float]) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().float().cpu().contiguous() for k, v in module_state.items()}
    for i, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{i}.{name}"] = torch.as_tensor(value).float().cpu().contiguous()
    save_file(tensors, str(path), metadata={"step": str(step), "losses": json.dumps(losses)})


def _load_checkpoint(path: Path, module, optimizer, prefix_map) -> tuple[int, list[float]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    prefix_map({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state["state"].setdefault(int(index), {})[name] = value if name != "step" else value.reshape(())
    optimizer.load_state_dict(state)
    return int(meta["step"]), json.loads(meta["losses"])


@dataclass
class Trainee:
    """The module being trained and how its trainable tensors are read and restored."""

    module: torch.nn.Module
    params: list
    state: Callable[[], dict]
    load: Callable[[dict], object]


def _trainee(opts: TrainOptions, target, draft_base) -> Trainee:
    if opts.kind == "medusa":
        heads = MedusaHeads(target.config.hidden_size, opts.num_heads, target.lm_head).to(opts.device)
        return Trainee(heads, list(heads.blocks.parameters()), heads.trainable_state,
                       lambda s: heads.load_state_dict(s, strict=False))
    draft = make_draft_model(draft_base, opts.num_layers).to(opts.device)  # already fp32
    return Trainee(draft, list(draft.model.layers.parameters()), lambda: draft_trainable_state(draft),
                   lambda s: draft.model.layers.load_state_dict({k[len("layers."):]: v for k, v in s.items()}))


def _train_steps(opts: TrainOptions, target, trainee: Trainee, ids, lengths) -> list[float]:
    optimizer = torch.optim.AdamW(trainee.params, lr=opts.lr, weight_decay=0.0)
    schedule = lambda step: min(1.0, (step + 1) / 20) * max(0.05, 1 - step / opts.steps)  # noqa: E731
    _, ckpt_path = _paths(opts.out)
    step, losses = 0, []
    if opts.resume and ckpt_path.exists():
        step, losses = _load_checkpoint(ckpt_path, trainee.module, optimizer, trainee.load)
        data.log(f"resuming from {ckpt_path} at step {step}")
    bar = tqdm(total=opts.steps, initial=step, desc=f"train-{opts.kind}", unit="step")
    while step < opts.steps:
        for group in optimizer.param_groups:
            group["lr"] = opts.lr * schedule(step)
        batch, valid = _batch(ids, lengths, opts, step)
        with torch.no_grad():
            out = target(input_ids=batch, attention_mask=valid.long(), output_hidden_states=True)
            labels = out.logits.argmax(-1)
        if opts.kind == "medusa":
            loss = medusa_loss(trainee.module, out.hidden_states[-1], labels, valid)
        else:
            loss = draft_loss(trainee.module, batch, labels, valid)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainee.params, 1.0)
        optimizer.step()
        losses.append(round(float(loss), 5))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % opts.checkpoint_every == 0 or step == opts.steps:
            _save_checkpoint(ckpt_path, trainee.state(), optimizer, step, losses)
    bar.close()
    return losses


def train(opts: TrainOptions) -> dict:
    torch.manual_seed(opts.seed)
    started = time.perf_counter()
    ckpt = load_checkpoint(opts.model)
    # The draft shares embeddings/norm/lm_head with the target; give it its own fp32 copy so the
    # teacher can run in bf16.
    draft_base = copy.deepcopy(ckpt.model) if opts.kind == "draft" else None
    target = ckpt.model.to(opts.device)
    if opts.device == "cuda":
        target = target.to(torch.bfloat16)
    target.eval().requires_grad_(False)
    ids, lengths, info = build_dataset(opts, target, ckpt.tokenizer)
    trainee = _trainee(opts, target, draft_base)
    losses = _train_steps(opts, target, trainee, ids, lengths)

    window = max(1, min(20, len(losses) // 4))
    summary = {**{k: str(v) for k, v in asdict(opts).items()}, **info,
               "first_loss": sum(losses[:window]) / window, "final_loss": sum(losses[-window:]) / window,
               "train_seconds": round(time.perf_counter() - started, 1)}
    meta = {"kind": opts.kind, "vocab_size": str(target.config.vocab_size),
            "hidden_size": str(target.config.hidden_size), "summary": json.dumps(summary)}
    meta["num_heads" if opts.kind == "medusa" else "num_layers"] = str(
        opts.num_heads if opts.kind == "medusa" else opts.num_layers)
    save_weights(trainee.state(), opts.out, meta)
    data.log(f"wrote {opts.out}: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}")
    return summary


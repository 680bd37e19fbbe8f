"""`treespec train-eagle`: build the self-distillation data and train the EAGLE head on it.

The target answers a prompt set the project builds (exporter/eagle_data.py), the token ids are
kept in --data (uint16 shards, reused on the next run), and the head is trained on features the
frozen target recomputes (exporter/eagle_train.py). tools/gpu_train_eagle.sh is the GPU run behind
the committed weights; a tiny config runs on the CPU in seconds (tests/test_eagle_train.py).

The head is saved with a draft vocabulary (--draft-vocab K, EAGLE-3's: the K most frequent answer
tokens, exporter/eagle_vocab.py). An existing head gets one without training:
    treespec train-eagle --vocab-only --init HEAD.safetensors --data DATASET_DIR --draft-vocab K --out NEW.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from treespec.errors import InputError
from treespec.exporter.eagle_vocab import DEFAULT_DRAFT_VOCAB

POSITIVE = ("token_batch", "max_length", "new_tokens", "generate_batch", "unroll", "epochs", "lr", "warmup")
NON_NEGATIVE = ("prompts", "seed_questions", "seed_paragraphs", "corpus_prompts", "heldout", "target_tokens",
                "compare_unroll", "time_budget", "bench_answers", "draft_vocab")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="target checkpoint or preset (default smollm2-135m)")
    p.add_argument("--out", required=True, type=Path, help="head weights to write (.safetensors)")
    p.add_argument("--data", type=Path, help="dataset folder to reuse or create (default: OUT without suffix + .data)")
    p.add_argument("--rebuild-data", action="store_true", help="build the dataset even if --data holds one")
    p.add_argument("--extra-data", type=Path, action="append", default=[], metavar="DIR",
                   help="also train on the training rows of this dataset (built by a run with another --seed); "
                        "repeatable")
    p.add_argument("--data-only", action="store_true", help="build the dataset in --data, then stop")
    p.add_argument("--draft-vocab", type=int, default=DEFAULT_DRAFT_VOCAB, metavar="K",
                   help="save the head with a draft vocabulary: the K most frequent answer tokens of the training "
                        f"data, EOS always among them (default {DEFAULT_DRAFT_VOCAB}; 0: the full vocabulary)")
    p.add_argument("--vocab-only", action="store_true",
                   help="no training: write the head of --init with a --draft-vocab K vocabulary built from the "
                        "existing dataset in --data (and --extra-data) to --out")
    d = p.add_argument_group("data (the target answers a prompt set the project builds)")
    d.add_argument("--prompts", type=int, default=40_000, help="templated prompt draws (about 31k distinct)")
    d.add_argument("--seed-questions", type=int, default=6_000, help="questions the target writes")
    d.add_argument("--seed-paragraphs", type=int, default=3_000, help="paragraphs the target writes, then gets asked about")
    d.add_argument("--corpus-prompts", type=int, default=1_500, help="prompts about local text snippets")
    d.add_argument("--heldout", type=int, default=300, help="prompts kept out of training, for evaluation")
    d.add_argument("--target-tokens", type=int, default=10_500_000,
                   help="training tokens to reach with extra sampled answers (0: greedy answers only)")
    d.add_argument("--new-tokens", type=int, default=288, help="longest answer")
    d.add_argument("--generate-batch", type=int, default=4096, help="sequences the target answers at once")
    d.add_argument("--temperature", type=float, default=0.8, help="for target-written prompts and extra answers")
    d.add_argument("--bench-answers", type=int, default=0,
                   help="bench prompts the target answers for evaluation only (0: all)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=2.0)
    t.add_argument("--token-batch", type=int, default=16384, help="padded tokens per batch")
    t.add_argument("--max-length", type=int, default=640, help="longest training sequence (tokens)")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=int, default=100, help="steps of linear LR warm-up")
    t.add_argument("--unroll", type=int, default=4, help="training-time-test depth (1: EAGLE-1 training)")
    t.add_argument("--compare-unroll", type=int, default=1,
                   help="also train a head with this depth and keep the better on held-out prompts (0: off)")
    t.add_argument("--ce-weight", type=float, default=0.5, help="weight of the token loss against the feature loss")
    t.add_argument("--init", type=Path, help="head weights (.safetensors) to start from: continue a run")
    t.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for the whole run: training stops (its LR decayed) in time to evaluate and save")
    p.add_argument("--summary", type=Path, help="also write the summary JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")


def _check(args) -> None:
    if args.out.suffix != ".safetensors":
        raise InputError("--out must end in .safetensors")
    if args.out.exists() and not args.force and not args.data_only:
        raise InputError(f"{args.out} exists: pass --force to overwrite it")
    for name in POSITIVE:
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    for name in NON_NEGATIVE:
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must not be negative")
    if args.heldout >= args.prompts + args.seed_questions + args.seed_paragraphs + args.corpus_prompts:
        raise InputError("--heldout must be smaller than the number of prompts")
    for extra in args.extra_data:
        if not (extra / "index.npz").is_file():
            raise InputError(f"--extra-data {extra}: no EAGLE dataset there (index.npz)")
    if args.init is not None and not args.init.is_file():
        raise InputError(f"--init {args.init}: no such file")
    if args.vocab_only:
        _check_vocab_only(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA GPU is available")


def _check_vocab_only(args) -> None:
    if args.init is None or args.data is None or args.draft_vocab <= 0 or args.data_only:
        raise InputError("--vocab-only needs --init HEAD, --data DIR and --draft-vocab K > 0 (and not --data-only)")
    if not (args.data / "index.npz").is_file():
        raise InputError(f"--data {args.data}: no EAGLE dataset there (index.npz); --vocab-only never builds one")


def run(args) -> int:
    from treespec.exporter.eagle_data import DataOptions
    from treespec.exporter.eagle_train import EagleOptions, TrainConfig, run_training, run_vocab_only

    _check(args)
    data = DataOptions(templated=args.prompts, seed_questions=args.seed_questions,
                       seed_paragraphs=args.seed_paragraphs, corpus=args.corpus_prompts, heldout=args.heldout,
                       target_tokens=args.target_tokens, new_tokens=args.new_tokens,
                       batch_size=args.generate_batch, temperature=args.temperature, seed=args.seed,
                       bench_answers=args.bench_answers)
    train = TrainConfig(epochs=args.epochs, token_batch=args.token_batch, max_length=args.max_length, lr=args.lr,
                        warmup=args.warmup, unroll=args.unroll, compare_unroll=args.compare_unroll,
                        ce_weight=args.ce_weight, seed=args.seed)
    data_dir = args.data or args.out.with_name(args.out.stem + ".data")
    opts = EagleOptions(out=args.out, data_dir=data_dir, model=args.model, device=args.device,
                        rebuild_data=args.rebuild_data, time_budget=args.time_budget, init=args.init,
                        extra_data=tuple(args.extra_data), data_only=args.data_only, draft_vocab=args.draft_vocab,
                        data=data, train=train)
    summary = (run_vocab_only if args.vocab_only else run_training)(opts, _log)
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=1))
    if args.data_only or args.vocab_only:
        print(json.dumps(summary["draft_vocab" if args.vocab_only else "data"], indent=1))
        return 0
    print(json.dumps({k: summary[k] for k in ("data", "kept_unroll")} | {
        "eval": {h: {s: {m: v for m, v in e[s].items() if m != "rank_rates"} for s in e}
                 for h, e in summary["eval"].items()}}, indent=1))
    return 0


def _log(message: str) -> None:
    print(f"[treespec train-eagle] {message}", file=sys.stderr, flush=True)

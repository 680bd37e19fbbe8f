"""`treespec train-medusa` and `treespec train-draft`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from treespec.errors import InputError


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    medusa = name == "train-medusa"
    p.add_argument("--model", default="smollm2-135m", help="target checkpoint or preset (default smollm2-135m)")
    p.add_argument("--out", required=True, type=Path, help="weights file to write (.safetensors)")
    p.add_argument("--corpus", action="append", type=Path, default=[],
                   help="folder of text (repeatable); default: Python sources and installed docs")
    p.add_argument("--corpus-bytes", type=int, default=20_000_000)
    p.add_argument("--sequences", type=int, default=2048, help="prompts the target answers (training data)")
    p.add_argument("--corpus-windows", type=int, default=0, help="extra raw-text windows")
    p.add_argument("--generate-batch", type=int, default=128, help="prompts the target answers at once")
    p.add_argument("--new-tokens", type=int, default=192)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3 if medusa else 3e-4)
    if medusa:
        p.add_argument("--num-heads", type=int, default=4)
    else:
        p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--dataset", type=Path, help="dataset file to reuse or create (share it between drafters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and dataset")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(kind="medusa" if medusa else "draft")


def run(args) -> int:
    from treespec.exporter.distill_train import TrainOptions, train

    if args.out.suffix != ".safetensors":
        raise InputError("--out must end in .safetensors")
    if args.out.exists() and not args.force:
        raise InputError(f"{args.out} exists: pass --force to overwrite it")
    for name in ("steps", "batch_size", "sequences", "new_tokens", "corpus_bytes"):
        if getattr(args, name) < (0 if name == "sequences" else 1):
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA GPU is available")
    opts = TrainOptions(kind=args.kind, model=args.model, out=args.out, corpus=args.corpus,
                        corpus_bytes=args.corpus_bytes, sequences=args.sequences,
                        corpus_windows=args.corpus_windows, generate_batch=args.generate_batch, new_tokens=args.new_tokens, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                        checkpoint_every=args.checkpoint_every, resume=not args.no_resume, dataset=args.dataset,
                        num_heads=getattr(args, "num_heads", 4), num_layers=getattr(args, "num_layers", 2))
    summary = train(opts)
    print(json.dumps(summary, indent=2))
    return 0

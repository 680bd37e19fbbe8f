"""`treespec triton-repo --artifacts A --out DIR`: write a Triton model repository.

`--force` replaces DIR only if treespec wrote it (exporter/output_dir.py check_triton_repo_dir)."""
from __future__ import annotations

import argparse
from pathlib import Path

from treespec.artifacts import load_manifest
from treespec.exporter.output_dir import check_triton_repo_dir
from treespec.exporter.triton_repo import write_triton_repo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", required=True, type=Path, help="artifact directory from treespec-export")
    p.add_argument("--out", required=True, type=Path, help="model repository folder to write")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "tensorrt-rtx"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--force", action="store_true",
                   help="replace --out if it is a model repository treespec wrote (anything else is refused)")


def run(args) -> int:
    load_manifest(args.artifacts)  # a clear error for a missing or broken artifact directory
    check_triton_repo_dir(args.out, args.force, "--out")
    write_triton_repo(args.artifacts, args.out, backend=args.backend, device=args.device, force=args.force)
    print(f"wrote the Triton model repository {args.out}")
    return 0

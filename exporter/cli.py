"""treespec-export MODEL --out DIR: write an artifact directory for tree speculative decoding.

Every argument, --out included (exporter/output_dir.py), is checked before the checkpoint is
loaded. The default context is DEFAULT_MAX_CONTEXT (2048 tokens), the same as `treespec demo`'s
export, so the README's command and the demo make the same artifacts. The progress bar's clock
keeps moving during the one long step (exporting SmolLM2's target graph takes ~2 min on 2 cores).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from treespec.cli_util import run_cli
from treespec.errors import InputError
from treespec.exporter.output_dir import check_output_dir, check_triton_repo_dir
from treespec.exporter.pipeline import ExportOptions, run_export
from treespec.progress import heartbeat

DEFAULT_MAX_CONTEXT = 2048


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treespec-export",
        description="Export a Llama-family checkpoint (HF folder, .safetensors, .gguf or a preset: "
                    "smollm2-135m, tiny-random) to ONNX tree graphs, engines and a manifest.")
    p.add_argument("model", help="HF folder, .safetensors file, .gguf file, or preset name")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    p.add_argument("--attention", default="decomposed", choices=["decomposed", "onnx", "ort-mha", "plugin"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--drafter", action="append", choices=["lookup", "medusa", "draft", "eagle"],
                   help="drafter(s) to include (repeatable; the first is the default). Default: lookup")
    p.add_argument("--drafter-weights", action="append", default=[], metavar="KIND=PATH",
                   help="trained weights (safetensors) for a drafter, e.g. medusa=heads.safetensors")
    p.add_argument("--engines", default="none", choices=["none", "tensorrt", "tensorrt-rtx"])
    p.add_argument("--compute-capability", action="append", dest="compute_capabilities",
                   help="TensorRT-RTX target compute capability (repeatable); default: its portable set")
    p.add_argument("--triton-repo", type=Path, help="also write a Triton model repository here")
    p.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT,
                   help=f"KV cache capacity in tokens (default {DEFAULT_MAX_CONTEXT}, or the model's limit if "
                        "smaller); the context a prompt plus its answer must fit in")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-tree-tokens", type=int, default=128)
    p.add_argument("--ort-fusions", action="store_true",
                   help="apply ONNX Runtime's transformer fusions (RMSNorm + residual) to the target and draft "
                        "graphs: faster on ONNX Runtime, not buildable as TensorRT engines")
    p.add_argument("--force", action="store_true",
                   help="replace --out if an earlier treespec-export wrote it (anything else is refused)")
    return p


def _weights(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        kind, sep, path = item.partition("=")
        if not sep or kind not in ("medusa", "draft", "eagle"):
            raise InputError(f"--drafter-weights expects medusa=PATH, draft=PATH or eagle=PATH, got '{item}'")
        if not Path(path).is_file():
            raise InputError(f"--drafter-weights: {path} does not exist")
        out[kind] = Path(path)
    return out


def export_with_progress(opts: ExportOptions):
    """run_export with a progress bar on a terminal whose clock keeps moving during long steps."""
    steps = 3 + len(opts.drafters) + (opts.engines != "none") + (opts.triton_repo is not None)
    # On a terminal only, and erased at the end: a user error stays one line on stderr.
    bar = tqdm(total=steps, bar_format="{n_fmt}/{total_fmt} {desc} [{elapsed}]", file=sys.stderr,
               disable=not sys.stderr.isatty(), leave=False)
    started: list[str] = []

    def progress(message: str) -> None:
        if started:
            bar.update(1)
        started.append(message)
        bar.set_description_str(message)

    try:
        with heartbeat(None if bar.disable else lambda elapsed: bar.refresh()):
            return run_export(opts, progress)
    finally:
        bar.close()


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_context", "max_batch", "max_tree_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    opts = ExportOptions(
        model=args.model, out=args.out, attention=args.attention, precision=args.precision,
        drafters=args.drafter or ["lookup"], drafter_weights=_weights(args.drafter_weights),
        engines=args.engines, compute_capabilities=args.compute_capabilities,
        triton_repo=args.triton_repo, max_context=args.max_context, max_batch=args.max_batch,
        max_tree_tokens=args.max_tree_tokens, ort_fusions=args.ort_fusions, force=args.force)
    check_output_dir(opts.out, opts.force)
    if opts.triton_repo is not None:
        if opts.triton_repo.resolve() == opts.out.resolve():
            raise InputError("--triton-repo must be another folder than --out")
        check_triton_repo_dir(opts.triton_repo, opts.force)
    manifest = export_with_progress(opts)
    sizes = manifest.export["sizes_bytes"]
    print(f"wrote {opts.out} ({sum(sizes.values()) / 1e6:.1f} MB): "
          + ", ".join(f"{k} {v:.1f}s" for k, v in manifest.export["timings_s"].items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The `treespec` command: a table of subcommands.

Every subcommand is a module under treespec.runtime.commands with the same shape:
`add_arguments(parser)` and `run(args) -> int`. Adding one is one row in SUBCOMMANDS. Modules are
imported when the parser is built, by name, so a module that an installation lacks leaves its
subcommand saying so instead of breaking every other one.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from treespec.cli_util import run_cli


@dataclass(frozen=True)
class Subcommand:
    module: str  # under treespec.runtime.commands
    help: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "generate": Subcommand("generate", "generate text with tree speculative decoding"),
    "demo": Subcommand("demo", "export SmolLM2 + drafters if needed, then compare speculative vs. plain decoding"),
    "serve": Subcommand("serve", "serve the artifacts with a real Triton Inference Server"),
    "triton-repo": Subcommand("triton_repo", "write a Triton model repository for the artifacts"),
    "train-medusa": Subcommand("train_medusa", "train Medusa heads by self-distillation"),
    "train-draft": Subcommand("train_draft", "train a small draft LM by self-distillation"),
    "train-eagle": Subcommand("train_eagle", "build the EAGLE head's data with the target and train it"),
    "loadtest": Subcommand("loadtest", "concurrent streaming clients against treespec serve: tokens/s, latency, lossless"),
    "bench": Subcommand("bench", "benchmark backends x drafters x trees against baselines"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treespec", description="Tree speculative decoding runtime.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        module = _command_module(command.module)
        if module is None:
            p.set_defaults(handler=_unavailable(name))
            continue
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def _command_module(module: str):
    try:
        return importlib.import_module(f"treespec.runtime.commands.{module}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("treespec.runtime.commands"):
            return None
        raise


def _unavailable(name: str):
    def handler(args) -> int:
        print(f"error: 'treespec {name}' is not available in this installation", file=sys.stderr)
        return 2

    return handler


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

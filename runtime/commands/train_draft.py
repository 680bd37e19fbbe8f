"""`treespec train-draft`: the subcommand shape (add_arguments/run) around runtime/commands/train.py,
which holds the training options shared by train-medusa and train-draft."""
from __future__ import annotations

import argparse

from treespec.runtime.commands import train


def add_arguments(p: argparse.ArgumentParser) -> None:
    train.add_arguments(p, "train-draft")


def run(args) -> int:
    return train.run(args)

"""Shared CLI behaviour: user errors print one line and exit 2, Ctrl-C exits 130."""
from __future__ import annotations

import os
import sys
from typing import Callable


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    from treespec.errors import TreespecError
    from treespec.errors import BackendError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return main(argv)
    except (TreespecError, BackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

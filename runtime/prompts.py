"""Prompt files: JSONL with either a "prompt" string or chat "messages" per line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treespec.errors import InputError

BUNDLED_BENCH = Path(__file__).resolve().parent.parent / "tests" / "data" / "bench.jsonl"


def read_prompts(path: Path, limit: int | None = None) -> list[Any]:
    if not path.is_file():
        raise InputError(f"prompts file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc})") from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            prompts.append(row["messages"])
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        else:
            raise InputError(f"{path}:{number}: expected a 'prompt' string or a 'messages' list")
    if not prompts:
        raise InputError(f"{path} holds no prompts")
    return prompts[:limit] if limit else prompts

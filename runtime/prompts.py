"""Prompts: JSONL prompt files (a "prompt" string or chat "messages" per line), and turning a
prompt into token ids with user text kept as plain text (PromptEncoder)."""
from __future__ import annotations

import json
import re
import secrets
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
        except ValueError as exc:  # JSONDecodeError, or an integer over Python's 4300-digit limit
            raise InputError(f"{path}:{number}: not valid JSON ({str(exc)[:120]})") from None
        except RecursionError:
            raise InputError(f"{path}:{number}: JSON nested too deeply") from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            prompts.append(row["messages"])
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        else:
            raise InputError(f"{path}:{number}: expected a 'prompt' string or a 'messages' list")
    if not prompts:
        raise InputError(f"{path} holds no prompts")
    return prompts[:limit] if limit else prompts


def read_categories(path: Path, limit: int | None = None) -> list[str | None]:
    """The "category" of each prompt of a file read_prompts accepted (None where a line has none),
    for per-category acceptance in the bench."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    categories = [str(r["category"]) if isinstance(r.get("category"), str) else None for r in rows]
    return categories[:limit] if limit else categories


class PromptEncoder:
    """Prompts to token ids, with user text kept as plain text.

    A chat template turns messages into text with control tokens (`<|im_start|>system` ...) and
    the tokenizer maps those strings back to control tokens. So user text containing them could
    open a new system or assistant turn (issue 14). As chat servers do, message contents are
    tokenized with special tokens disabled (`split_special_tokens`): `<|im_start|>` typed by a user
    becomes ordinary text tokens. Prompts without control strings take the plain path, so their
    token ids are exactly the template's. `raw=True` is the opt-out: the text is tokenized as
    given, control tokens included (for callers that write their own template).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.control = sorted({t.content for t in added.values() if len(t.content) > 1}, key=len, reverse=True)

    def has_control(self, text: str) -> bool:
        return any(c in text for c in self.control)

    def encode_text(self, text: str, raw: bool = False) -> list[int]:
        if raw:
            return list(self.tokenizer.encode(text))
        if self.has_template:
            return self.encode_messages([{"role": "user", "content": text}])
        return list(self.tokenizer.encode(text, split_special_tokens=self.has_control(text)))

    def encode_messages(self, messages: list[dict]) -> list[int]:
        if not any(self.has_control(str(m.get("content", ""))) for m in messages):
            return self._template_ids(messages)
        marks = {f"\u2063{secrets.token_hex(8)}\u2063": str(m.get("content", "")) for m in messages}
        marked = [{**m, "content": mark} for m, mark in zip(messages, marks)]
        rendered = self.tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
        ids: list[int] = []
        for piece in re.split("(" + "|".join(map(re.escape, marks)) + ")", rendered):
            if piece in marks:
                ids += self.tokenizer.encode(marks[piece], add_special_tokens=False, split_special_tokens=True)
            elif piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False)
        return ids

    def _template_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

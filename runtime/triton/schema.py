"""The generate request: its fields, their types and limits, checked the same way at both doors.

Two doors lead to the model. The HTTP front (runtime/triton/front.py) reads JSON; gRPC and the
KServe infer endpoint hand the model (runtime/triton/model.py) tensors. Both turn what they got
into plain Python values and call `check_request`, so a value is refused with the same one-line
message whichever door it came through, before the model does any work.

Why the front re-checks what the model checks anyway (measured on tritonserver 2.51, issue 14):
its generate endpoint parses JSON itself, and a few MB of nested `[` kill it with signal 11, a
body with 400k keys holds it for minutes, `max_tokens` of 10^12 wraps to a negative int32 and a
non-JSON body is a 500. So the front refuses all of that and forwards only the fields below,
re-serialised. Caps that hold at both doors: text (MAX_TEXT_CHARS: a 10 MB prompt held the model
17 s in the tokenizer before it could be refused), token ids, trees (runtime/trees caps), and the
request's own deadline (`timeout`, seconds: DEFAULT_TIMEOUT_S, at most MAX_TIMEOUT_S).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from treespec.errors import InputError
from treespec.runtime.api import MAX_NEW_TOKENS_LIMIT, MAX_SEED
from treespec.runtime.trees.config import show_value
from treespec.runtime.trees.presets import MAX_CONFIG_BYTES, preset_names, read_tree_config

MAX_BODY_BYTES = 1 << 20  # an HTTP request body; larger ones get 413 at the front
MAX_TEXT_CHARS = 1 << 19  # text_input (the model refuses far less: what its context can hold)
MAX_INPUT_IDS = 1 << 16
MAX_TOP_K = (1 << 31) - 1  # an INT32 tensor
DEFAULT_TIMEOUT_S = 120.0
MAX_TIMEOUT_S = 600.0
DEADLINE_MESSAGE = "deadline exceeded"  # starts the model's error when a timeout runs out (front: 408)
MAX_MESSAGES = 256  # chat messages in one request
ROLES = ("system", "developer", "user", "assistant", "tool")
FIELDS = ("text_input", "input_ids", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream",
          "tree", "raw", "timeout")


@dataclass
class GenerateRequest:
    """One checked request. max_tokens None: the model's default."""
    text_input: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None  # chat messages: the model applies the chat template
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False
    tree: str | None = None
    raw: bool = False
    timeout: float = DEFAULT_TIMEOUT_S

    def to_json(self) -> dict[str, Any]:
        """The fields that were set, as the generate endpoint takes them."""
        defaults = GenerateRequest()
        out = {k: v for k, v in asdict(self).items() if v != getattr(defaults, k) or k == "stream"}
        if self.messages is not None:  # one BYTES tensor: the messages as JSON text
            out["messages"] = json.dumps(self.messages)
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(name: str, value: Any, low: int, high: int, shown_high: str | None = None) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise InputError(f"{name} must be an integer in [{low}, {shown_high or high}], got {show_value(value)}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {show_value(value)}")
    return float(value)


def _unicode(name: str, text: str) -> str:
    """Text that UTF-8 can carry: a lone surrogate (JSON lets "\\ud800" through) makes Triton's parser answer 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name} is not valid Unicode (it holds a lone surrogate)") from None
    return text


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {show_value(value)}")
    return value


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages: a list (or its JSON text) of {"role", "content"} with string contents (or lists of
    {"type": "text", "text"} parts, joined)."""
    if isinstance(messages, str):
        if len(messages) > 2 * MAX_TEXT_CHARS:
            raise InputError(f"messages has {len(messages)} characters, over the limit of {2 * MAX_TEXT_CHARS}")
        try:
            messages = json.loads(messages)
        except (ValueError, RecursionError):
            raise InputError("messages is not a JSON list of messages") from None
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    if len(messages) > MAX_MESSAGES:
        raise InputError(f"messages has {len(messages)} messages, over the limit of {MAX_MESSAGES}")
    out, chars = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InputError(f"messages[{i}] must be an object with a role in {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string (or a list of text parts), "
                             f"got {show_value(content)}")
        chars += len(content)
        out.append({"role": message["role"], "content": _unicode(f"messages[{i}].content", content)})
    if chars > MAX_TEXT_CHARS:
        raise InputError(f"messages hold {chars} characters, over the limit of {MAX_TEXT_CHARS}")
    return out


def check_prompt(values: dict[str, Any], req: GenerateRequest) -> None:
    text, ids, messages = values.get("text_input"), values.get("input_ids"), values.get("messages")
    if sum(v is not None for v in (text, ids, messages)) > 1:
        raise InputError("give either text_input or input_ids or messages, only one of them")
    if messages is not None:
        req.messages = check_messages(messages)
    elif text is not None:
        if not isinstance(text, str):
            raise InputError(f"text_input must be a string, got {show_value(text)}")
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(f"text_input has {len(text)} characters, over the limit of {MAX_TEXT_CHARS}")
        req.text_input = _unicode("text_input", text)
    elif ids is not None:
        if not isinstance(ids, list) or not ids:
            raise InputError("input_ids must be a non-empty list of token ids")
        if len(ids) > MAX_INPUT_IDS:
            raise InputError(f"input_ids has {len(ids)} ids, over the limit of {MAX_INPUT_IDS}")
        if not all(_is_int(t) and 0 <= t <= MAX_SEED for t in ids):
            raise InputError("input_ids must be non-negative integer token ids")
        req.input_ids = list(ids)
    else:
        raise InputError("missing input: give text_input (text), input_ids (token ids) or messages (chat)")


def check_tree(tree: Any) -> str | None:
    """A tree as the model takes it: None, "none", a preset name or inline JSON (a JSON object is
    accepted too). Never a file path: a request must not make the server read files."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        tree = json.dumps(tree)
    if not isinstance(tree, str):
        raise InputError(f"tree must be a preset name, none or a JSON object, got {show_value(tree)}")
    if len(tree) > MAX_CONFIG_BYTES:
        raise InputError(f"tree: {len(tree)} characters is over the {MAX_CONFIG_BYTES // 1024} KB limit")
    _unicode("tree", tree)
    if tree != "none" and not tree.lstrip().startswith("{") and tree not in preset_names():
        raise InputError(f"unknown tree {show_value(tree)}: use none, inline JSON or a preset "
                         f"({', '.join(preset_names())})")
    read_tree_config(tree)  # bounded by construction: refuses over-cap trees at once
    return tree


def check_request(values: dict[str, Any], max_timeout: float = MAX_TIMEOUT_S) -> GenerateRequest:
    """A GenerateRequest from plain values (JSON, or tensors' items); InputError on the first problem."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown field {show_value(unknown[0])} (known: {', '.join(FIELDS)})")
    req = GenerateRequest()
    check_prompt(values, req)
    if values.get("max_tokens") is not None:
        req.max_tokens = _int("max_tokens", values["max_tokens"], 1, MAX_NEW_TOKENS_LIMIT)
    if values.get("temperature") is not None:
        req.temperature = _number("temperature", values["temperature"])
        if req.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {req.temperature}")
    if values.get("top_p") is not None:
        req.top_p = _number("top_p", values["top_p"])
        if not 0.0 < req.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {req.top_p}")
    if values.get("top_k") is not None:
        req.top_k = _int("top_k", values["top_k"], 0, MAX_TOP_K)
    if values.get("seed") is not None:
        req.seed = _int("seed", values["seed"], 0, MAX_SEED, "2^63 - 1")
    for flag in ("stream", "raw"):
        if values.get(flag) is not None:
            setattr(req, flag, _bool(flag, values[flag]))
    req.tree = check_tree(values.get("tree"))
    if values.get("timeout") is not None:
        req.timeout = _number("timeout", values["timeout"])
        if not 0 < req.timeout <= max_timeout:
            raise InputError(f"timeout must be in (0, {max_timeout:g}] seconds, got {req.timeout:g}")
    return req

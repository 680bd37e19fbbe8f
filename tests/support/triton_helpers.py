"""Clients and fixtures' building blocks for the tests against the real Triton server.

Every call has a bounded timeout: a server that stops answering fails the test, it never hangs it.
"""
from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

# Short chat prompts; the server applies the chat template as the Python API does.
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain what a CPU does in one sentence.",
]
MAX_TOKENS = 16
TIMEOUT = 120.0  # seconds without a response before a request counts as hung
LEFT = "the client left"
NUMPY = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_, "BYTES": np.object_}


@dataclass
class StreamResult:
    text: str = ""
    ids: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)  # accepted_tokens of each response
    responses: int = 0
    final: bool = False
    error: str | None = None
    first_s: float | None = None  # time to the first response
    total_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.final


def _inputs(tg, text=None, input_ids=None, max_tokens=MAX_TOKENS, stream=True, tree=None, request_timeout=None,
            **scalars):
    items = []

    def add(name, dtype, value):
        t = tg.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        items.append(t)

    if text is not None:
        add("text_input", "BYTES", np.array([text.encode("utf-8")], dtype=np.object_))
    if input_ids is not None:
        add("input_ids", "INT64", np.array(input_ids, dtype=np.int64))
    if max_tokens is not None:
        add("max_tokens", "INT32", np.array([max_tokens], dtype=np.int32))
    add("stream", "BOOL", np.array([stream]))
    if tree is not None:
        add("tree", "BYTES", np.array([tree.encode()], dtype=np.object_))
    if request_timeout is not None:  # the request's own deadline, seconds (not the client's wait)
        add("timeout", "FP32", np.array([request_timeout], dtype=np.float32))
    for name, (dtype, value) in scalars.items():  # e.g. temperature=("FP32", 0.5)
        add(name, dtype, np.array([value], dtype=NUMPY[dtype]))
    return items


def grpc_stream(url: str, text=None, input_ids=None, max_tokens=MAX_TOKENS, stream=True, tree=None,
                timeout: float = TIMEOUT, on_response=None, raw_inputs=None, request_timeout=None,
                **scalars) -> StreamResult:
    """One request on a gRPC bidirectional stream; collects responses until the final one.
    on_response(progress) sees each response; returning False makes the client leave (cancel)."""
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(url)
    q: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)), stream_timeout=timeout * 4)
    out = StreamResult()
    # Cancel only a request still running. Triton 2.51 leaks a request whose stream is cancelled
    # after it was answered with an error: the server then waits its whole exit timeout at shutdown.
    cancel = False
    t0 = time.perf_counter()
    try:
        inputs = raw_inputs(tg) if raw_inputs else _inputs(tg, text, input_ids, max_tokens, stream, tree,
                                                           request_timeout, **scalars)
        try:
            client.async_stream_infer("treespec", inputs, enable_empty_final_response=True)
        except tg.InferenceServerException as exc:  # the stream broke first (the server went away):
            out.error = str(exc)                     # an error like the callback's, not an exception
            return out
        while True:
            try:
                result, error = q.get(timeout=timeout)
            except queue.Empty:
                out.error = f"no response within {timeout} s (hung)"
                cancel = True
                break
            if error is not None:
                out.error = str(error)
                break
            if out.first_s is None:
                out.first_s = time.perf_counter() - t0
            response = result.get_response()
            if response.outputs:
                out.responses += 1
                out.text += b"".join(result.as_numpy("text_output").reshape(-1)).decode("utf-8")
                out.ids += [int(t) for t in result.as_numpy("output_ids").reshape(-1)]
                out.accepted.append(int(result.as_numpy("accepted_tokens").reshape(-1)[0]))
                if on_response is not None and on_response(out) is False:
                    out.error = LEFT  # the client goes away: stop_stream cancels the request
                    cancel = True
                    break
            if response.parameters["triton_final_response"].bool_param:
                out.final = True
                break
    finally:
        out.total_s = time.perf_counter() - t0
        try:
            client.stop_stream(cancel_requests=cancel)
        except Exception:
            pass
        client.close()
    return out


def http_post(url: str, body: dict | bytes, timeout: float = TIMEOUT) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_generate(server, body: dict, timeout: float = TIMEOUT) -> tuple[int, dict]:
    code, text = http_post(f"{server.http_url}/v2/models/treespec/generate", body, timeout)
    return code, json.loads(text)


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def ids_of(value) -> list[int]:
    """The generate endpoint returns a one-element output as a scalar."""
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def metrics(server) -> dict[str, float]:
    """treespec_* samples of the metrics endpoint, keyed by the sample's text before its value."""
    with urllib.request.urlopen(server.metrics_url, timeout=30) as r:
        lines = r.read().decode().splitlines()
    out = {}
    for line in lines:
        if line.startswith("treespec_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def repo_snapshot(repo: Path) -> dict[str, tuple]:
    """Every entry of a repository: file contents' hash and mtime, or a symlink's target."""
    import hashlib

    snap = {}
    for p in sorted(repo.rglob("*")):
        rel = str(p.relative_to(repo))
        if "__pycache__" in p.parts:
            continue
        if p.is_symlink():
            snap[rel] = ("link", str(p.readlink()))
        elif p.is_file():
            snap[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        else:
            snap[rel] = ("dir",)
    return snap


def expected_outputs(gen, prompts=PROMPTS, max_tokens=MAX_TOKENS, tree=None) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for p in prompts:
        r = gen.generate(p, max_new_tokens=max_tokens, tree=tree)
        out[p] = (r.text, list(r.token_ids))
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# Fuzz strategies (tests/test_triton_hostile.py): request bodies and tree configs, valid and hostile.
FIELD_NAMES = ["text_input", "input_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream",
               "tree", "raw", "timeout"]
POLICY_NAMES = ["none", "widths", "depth_branching", "choices", "opt", "adaptive", "auto", "eagle2", "nope"]
_BIG = st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)  # lone surrogates included
_ANY = st.recursive(st.none() | st.booleans() | _BIG | st.floats(allow_nan=True) | _TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
_GOOD = {  # values the service takes, kept small so that an accepted request finishes fast
    "text_input": st.text(min_size=1, max_size=40), "input_ids": st.lists(st.integers(0, 100), min_size=1, max_size=8),
    "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 50), "seed": st.integers(0, 2 ** 63 - 1), "stream": st.just(False),
    "tree": st.sampled_from(["none", "chain4"]), "raw": st.booleans(), "timeout": st.floats(0.2, 10),
}


def tree_configs():
    """Tree configs around the caps: every policy, sizes from 0 to 10^12, odd types."""
    size = st.one_of(st.integers(-2, 70), st.integers(0, 10 ** 12), st.sampled_from([64, 65, 1024, 1025, 4096, 4097]))
    return st.fixed_dictionaries({"policy": st.sampled_from(POLICY_NAMES)}, optional={
        "depth": size, "branching": size, "budget": size, "max_depth": size,
        "widths": st.lists(size, max_size=70), "choices": st.lists(st.lists(size, max_size=6), max_size=20),
        "delta": st.floats(allow_nan=True), "max_width": size, "extra": _ANY})


def hostile_bodies():
    """Request bodies: raw bytes, JSON of any shape, and objects mixing good and hostile field values."""
    field = st.sampled_from(FIELD_NAMES + ["colour", ""])
    mixed = st.dictionaries(field, _ANY, max_size=5)
    plausible = st.fixed_dictionaries({"text_input": _GOOD["text_input"], "max_tokens": _GOOD["max_tokens"]},
                                      optional={k: _GOOD[k] | _ANY for k in FIELD_NAMES[3:]})
    trees = st.fixed_dictionaries({"text_input": st.just("Hi"), "max_tokens": st.just(4), "tree": tree_configs()})
    return st.one_of(st.binary(max_size=200), _ANY.map(lambda v: json.dumps(v).encode()), mixed, plausible, trees)


def sse_parse(raw: bytes) -> list[str]:
    """The data of each event of a text/event-stream, per the published protocol (WHATWG HTML, server-
    sent events): lines end with CRLF, LF or CR; a blank line dispatches the event; `data:` lines (one
    optional space after the colon) are joined with LF; comments (`:`) and other fields are ignored."""
    text = raw.decode("utf-8")
    events, data, started = [], [], False
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if started:
                events.append("\n".join(data))
            data, started = [], False
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
            started = True
    return events  # an event without its blank line (cut off) is not dispatched


def openai_post(base: str, path: str, body: dict | bytes, timeout: float = TIMEOUT) -> tuple[int, bytes, str]:
    """(status, body, content type) of a POST to the OpenAI-compatible front."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def openai_stream_text(base: str, path: str, body: dict) -> tuple[str, list[dict]]:
    """A streaming OpenAI request: its text (deltas joined) and its chunks; asserts the protocol's framing."""
    code, raw, kind = openai_post(base, path, {**body, "stream": True})
    assert code == 200 and kind.startswith("text/event-stream"), (code, raw[:300])
    events = sse_parse(raw)
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    chat = path.endswith("chat/completions")
    text = "".join((c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
                   for c in chunks)
    return text, chunks

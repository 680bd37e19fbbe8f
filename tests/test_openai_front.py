"""The OpenAI-compatible front on the real service (tritonserver 2.51 + front, tiny model, CPU, 127.0.0.1).

A streaming chat request, read with an SSE parser that follows the published protocol (the `openai`
client is not installed here, and nothing else needs it), gives the same text as the non-streaming
request, as Triton's generate endpoint for the same prompt and as the Python API. Bad requests
(missing fields, wrong types, max_tokens over the context, an unknown model, n > 1) get a 4xx with
an OpenAI error object; a client that leaves mid-stream ends only its own stream, and the next
request is served correctly.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest

from support.triton_helpers import http_generate, openai_post, openai_stream_text

MODEL = "tiny-treespec"
PROMPT = "What is the capital of France?"
MAX_TOKENS = 12
GREEDY = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def expected(tiny_artifacts) -> str:
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(tiny_artifacts)
    text = gen.generate([{"role": "user", "content": PROMPT}], max_new_tokens=MAX_TOKENS).text
    gen.close()
    return text


@pytest.fixture(scope="module")
def service(tiny_artifacts, tmp_path_factory):
    from treespec.artifacts import load_manifest
    from treespec.exporter.triton_repo import write_triton_repo
    from treespec.runtime.triton.openai import OpenAIOptions
    from treespec.runtime.triton.service import TritonService

    repo = write_triton_repo(tiny_artifacts, tmp_path_factory.mktemp("triton") / "repo")
    options = OpenAIOptions(MODEL, load_manifest(tiny_artifacts).dims.max_context)
    with TritonService(repo, None, None, None, startup_timeout=300, exit_timeout=3, openai=options) as srv:
        yield srv


def base(service) -> str:
    return service.http_url


def chat_body(**extra) -> dict:
    return {**GREEDY, "messages": [{"role": "user", "content": PROMPT}], **extra}


def test_streaming_chat_equals_non_streaming_generate_endpoint_and_python_api(service, expected):
    streamed, chunks = openai_stream_text(base(service), CHAT, chat_body())
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len({c["id"] for c in chunks}) == 1 and all(c["model"] == MODEL for c in chunks)
    code, raw, _ = openai_post(base(service), CHAT, chat_body())
    assert code == 200, raw
    whole = json.loads(raw)
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    usage = whole["usage"]
    assert usage["completion_tokens"] <= MAX_TOKENS and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    code, out = http_generate(service, {"text_input": PROMPT, "max_tokens": MAX_TOKENS})
    assert code == 200, out
    print(f"\nstreamed chat ({len(chunks)} chunks): {streamed!r}")
    assert streamed == whole["choices"][0]["message"]["content"] == out["text_output"] == expected


def test_completions_stream_and_whole_agree_and_models_lists_the_served_name(service):
    body = {**GREEDY, "prompt": PROMPT}
    streamed, chunks = openai_stream_text(base(service), COMPLETIONS, body)
    code, raw, _ = openai_post(base(service), COMPLETIONS, body)
    whole = json.loads(raw)
    assert code == 200 and whole["object"] == "text_completion" and chunks[0]["object"] == "text_completion"
    assert streamed == whole["choices"][0]["text"]
    with urllib.request.urlopen(f"{base(service)}/v1/models", timeout=30) as r:
        models = json.loads(r.read())
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_stop_strings_cut_the_text_streaming_or_not(service, expected):
    words = expected.split()
    if len(words) < 2:
        pytest.skip("the tiny model's greedy text has no second word to stop at")  # a property of its weights
    stop = words[1]
    cut = expected[:expected.find(stop)]
    code, raw, _ = openai_post(base(service), CHAT, chat_body(stop=[stop]))
    whole = json.loads(raw)
    assert code == 200 and whole["choices"][0]["message"]["content"] == cut
    assert whole["choices"][0]["finish_reason"] == "stop"
    streamed, _ = openai_stream_text(base(service), CHAT, chat_body(stop=stop))
    assert streamed == cut


BAD = [
    (CHAT, {"messages": [{"role": "user", "content": "Hi"}]}, 400, "missing required field: model"),
    (CHAT, {"model": MODEL}, 400, "missing required field: messages"),
    (COMPLETIONS, {"model": MODEL}, 400, "missing required field: prompt"),
    (CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}, 404, "does not exist"),
    (CHAT, {"model": MODEL, "messages": "Hi"}, 400, "messages must be a non-empty list"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content must be a string"),
    (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "with a role in"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": "eight"}, 400, "max_tokens must be an integer"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "temperature": "hot"}, 400, "temperature must be a finite"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "stream": "yes"}, 400, "stream must be true or false"),
    (COMPLETIONS, {"model": MODEL, "prompt": {"a": 1}}, 400, "prompt must be a string"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 256}, 400, "context is 256 tokens"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 10 ** 12}, 400, "max_tokens must be an integer"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "n": 2}, 400, "only n=1"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "colour": "red"}, 400, "unrecognized request argument"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "presence_penalty": 1.5}, 400, "is not supported"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "stop": [""]}, 400, "stop must be"),
    (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "tree": "no-such-tree"}, 400, "unknown tree"),
    (COMPLETIONS, b"not json", 400, "is not JSON"),
    (COMPLETIONS, {"model": MODEL, "prompt": "   ", "stream": True}, 400, "the prompt is empty"),  # the model's
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[m for *_, m in BAD])
def test_bad_requests_get_a_4xx_with_an_openai_error_object(service, path, body, status, message):
    code, raw, kind = openai_post(base(service), path, body, timeout=60)
    error = json.loads(raw)["error"]
    assert code == status and message in error["message"], (code, raw)
    assert error["type"] == "invalid_request_error" and kind.startswith("application/json")
    assert set(error) >= {"message", "type", "code"}


def _leave_mid_stream(service) -> bytes:
    """Sends a streaming chat request on a raw socket, reads its first chunk, then disconnects."""
    host, port = service.front.host, service.front.port
    body = json.dumps(chat_body(max_tokens=48, stream=True)).encode()
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(head + body)
        got = b""
        while b"data: " not in got:
            piece = sock.recv(4096)
            assert piece, got
            got += piece
    return got


def test_a_client_that_leaves_mid_stream_ends_only_its_stream(service, expected):
    for _ in range(2):
        got = _leave_mid_stream(service)
        assert got.startswith(b"HTTP/1.1 200")
    t0 = time.perf_counter()
    streamed, _ = openai_stream_text(base(service), CHAT, chat_body())
    print(f"\nafter two clients left mid-stream, the next request took {time.perf_counter() - t0:.2f} s")
    assert streamed == expected
    assert service.server.restarts == 0

"""The OpenAI-compatible endpoints of the HTTP front: /v1/completions, /v1/chat/completions, /v1/models.

Why here and not a second server: LLM clients speak the OpenAI protocol, and the front
(runtime/triton/front.py) already stands between clients and tritonserver. An OpenAI request is
checked and translated into the same checked GenerateRequest (runtime/triton/schema.py) that the
generate endpoints take, then sent to Triton's generate / generate_stream, so both protocols run
the same model code and give the same tokens for the same request (tests/test_openai_front.py).

The protocol as published: `model` must be the served name (else 404 model_not_found); n=1 only;
`temperature` defaults to 1 and completions' `max_tokens` to 16, as OpenAI's; chat messages go
to the model whole (the chat template is applied there, as the Python API does); `stop` (up to 4
strings) is cut in the front; `tree` is treespec's extension (a preset name, "none" or a JSON
tree). Streaming answers Server-Sent Events `data: {chunk}` ending with `data: [DONE]`. Errors are
`{"error": {"message", "type", "code"}}` with a 4xx. A client that leaves mid-stream only ends
its stream: the front stops relaying, and the next request is served.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from treespec.errors import InputError
from treespec.runtime.triton.schema import GenerateRequest, check_request

COMPLETIONS, CHAT, MODELS = "/v1/completions", "/v1/chat/completions", "/v1/models"
MAX_STOPS = 4
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Fields OpenAI clients send by default: taken when they ask for nothing treespec does not do.
NEUTRAL = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logprobs": (None, False),
           "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1), "logit_bias": (None, {}),
           "suffix": (None,), "parallel_tool_calls": (None,), "tools": (None, []), "tool_choice": (None, "none")}
IGNORED = ("user", "stream_options", "metadata", "store", "service_tier")
OWN = {"model", "stream", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "tree", "top_k", "timeout"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    def body(self) -> bytes:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return json.dumps({"error": {"message": str(self), "type": kind, "param": self.param,
                                     "code": self.code}}).encode()


@dataclass
class OpenAIOptions:
    """What the front needs to answer the OpenAI protocol without the model: its served name and context."""
    model_name: str = "treespec"
    max_context: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class OpenAICall:
    """One checked OpenAI request: the generate request it becomes, and how to answer it."""
    chat: bool
    request: GenerateRequest
    stop: list[str]
    max_tokens: int | None


def models_body(options: OpenAIOptions) -> bytes:
    return json.dumps({"object": "list", "data": [{"id": options.model_name, "object": "model",
                                                   "created": options.created, "owned_by": "treespec"}]}).encode()


def _stops(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise OpenAIError(400, f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them", param="stop")
    return stops


def _prompt(values: dict, chat: bool) -> dict[str, Any]:
    if chat:
        if "messages" not in values:
            raise OpenAIError(400, "missing required field: messages", param="messages")
        if not isinstance(values["messages"], list):  # JSON text is the tensor form, not the protocol's
            raise OpenAIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
        return {"messages": values["messages"]}
    if "prompt" not in values:
        raise OpenAIError(400, "missing required field: prompt", param="prompt")
    prompt = values["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return {"text_input": prompt}
    if isinstance(prompt, list):
        return {"input_ids": prompt}
    raise OpenAIError(400, "prompt must be a string, a list of token ids, or a list of one of those", param="prompt")


def _check_extras(values: dict, chat: bool) -> None:
    for key, value in values.items():
        if key in OWN or key in IGNORED or key == ("messages" if chat else "prompt"):
            continue
        if key == "max_completion_tokens" and chat:
            continue
        if key in NEUTRAL:
            if value not in NEUTRAL[key]:
                raise OpenAIError(400, f"{key}={json.dumps(value)[:40]} is not supported by this server", param=key)
            continue
        raise OpenAIError(400, f"unrecognized request argument: {key[:40]}", param=key[:40])


def parse_call(values: Any, chat: bool, options: OpenAIOptions) -> OpenAICall:
    """An OpenAICall from a request body's JSON; OpenAIError (4xx) on the first problem."""
    if not isinstance(values, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    if "model" not in values:
        raise OpenAIError(400, "missing required field: model", param="model")
    if values["model"] != options.model_name:
        shown = json.dumps(values["model"])[:80]
        raise OpenAIError(404, f"the model {shown} does not exist (this server serves {options.model_name!r})",
                          code="model_not_found", param="model")
    _check_extras(values, chat)
    if values.get("n", 1) != 1 or isinstance(values.get("n"), bool):
        raise OpenAIError(400, "only n=1 is supported", param="n")
    limit = values.get("max_completion_tokens") if chat else None
    max_tokens = values.get("max_tokens", limit)
    if max_tokens is None and not chat:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    fields = {**_prompt(values, chat), "max_tokens": max_tokens,
              "temperature": values.get("temperature", 1.0), "stream": values.get("stream", False)}
    for key in ("top_p", "seed", "tree", "top_k", "timeout"):
        if values.get(key) is not None:
            fields[key] = values[key]
    try:
        request = check_request(fields)
    except InputError as exc:
        raise OpenAIError(400, str(exc)) from None
    if max_tokens is not None and options.max_context and max_tokens >= options.max_context:
        raise OpenAIError(400, f"max_tokens is {max_tokens}, but this model's context is {options.max_context} "
                               "tokens (prompt included)", code="context_length_exceeded", param="max_tokens")
    return OpenAICall(chat, request, _stops(values.get("stop")), max_tokens)


class StopCutter:
    """Text pieces in, text out, cut before the first stop string; holds back what might start one."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        cuts = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            out, self.pending = self.pending[:min(cuts)], ""
            return out
        keep = min(self.hold, len(self.pending))
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class Answer:
    """Builds the OpenAI objects of one call: the whole answer or its stream chunks."""

    def __init__(self, call: OpenAICall, options: OpenAIOptions):
        self.call, self.model = call, options.model_name
        self.id = f"{'chatcmpl' if call.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.cutter = StopCutter(call.stop)
        self.tokens, self.prompt_tokens = 0, 0

    def finish_reason(self) -> str:
        if self.cutter.stopped:
            return "stop"
        return "length" if self.call.max_tokens is not None and self.tokens >= self.call.max_tokens else "stop"

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": self.prompt_tokens + self.tokens}

    def take(self, event: dict) -> str:
        """A Triton response: counts its tokens; returns its text, cut at a stop string."""
        ids = event.get("output_ids", [])
        self.tokens += len(ids) if isinstance(ids, list) else 1
        self.prompt_tokens = int(event.get("prompt_tokens", self.prompt_tokens) or 0)
        return self.cutter.feed(str(event.get("text_output", "")))

    def whole(self, event: dict) -> bytes:
        text = self.take(event) + self.cutter.flush()
        if self.call.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self.finish_reason()}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish_reason()}
        kind = "chat.completion" if self.call.chat else "text_completion"
        return json.dumps({"id": self.id, "object": kind, "created": self.created, "model": self.model,
                           "choices": [choice], "usage": self.usage()}).encode()

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> bytes:
        if self.call.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        kind = "chat.completion.chunk" if self.call.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}
        return b"data: " + json.dumps(body).encode() + b"\n\n"


def error_of(status: int, body: bytes) -> OpenAIError:
    """An OpenAIError from the front's own error reply ({"error": message})."""
    try:
        message = str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError):
        message = body.decode("utf-8", "replace")[:200]
    return OpenAIError(status, message or "the request failed")


class OpenAIRelay:
    """Sends one checked call to tritonserver through the front's handler and answers in OpenAI's words.
    upstream_error turns a Triton error (status, body) into the front's Reply (408, 503, ...)."""

    def __init__(self, handler, options: OpenAIOptions, upstream_error, timeout_slack: float):
        self.handler, self.options = handler, options
        self.upstream_error, self.slack = upstream_error, timeout_slack

    def post(self, call: OpenAICall, path: str):
        data = json.dumps({**call.request.to_json(), "id": getattr(self.handler, "request_id", "")}).encode()
        try:
            return self.handler._send("POST", path, data, {"Content-Type": "application/json"},
                                      call.request.timeout + self.slack)
        except OSError:
            raise OpenAIError(503, "the server is restarting, retry in a moment") from None

    def failed(self, status: int, payload: bytes) -> OpenAIError:
        reply = self.upstream_error(status, payload)
        return error_of(reply.status, reply.body)

    def whole(self, call: OpenAICall, path: str) -> bytes:
        response = self.post(call, path)
        payload = response.read()
        if response.status >= 400:
            raise self.failed(response.status, payload)
        return Answer(call, self.options).whole(json.loads(payload))

    def stream(self, call: OpenAICall, path: str) -> None:
        """Peeks the first event (a refusal is still a 4xx), then relays chunks; [DONE] ends it."""
        response = self.post(call, path)
        if response.status >= 400:
            raise self.failed(response.status, response.read())
        events = (json.loads(line[6:]) for line in response if line.startswith(b"data: "))
        answer = Answer(call, self.options)
        first = next(events, {})
        if "error" in first:
            response.close()
            raise self.failed(400, json.dumps(first).encode())
        self._open()
        try:
            self._relay(answer, first, events)
        except (OSError, ValueError):
            pass  # the client left (or tritonserver died): this stream ends, nothing else does
        finally:
            response.close()

    def _open(self) -> None:
        handler = self.handler
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")
        handler.close_connection = True
        handler.end_headers()

    def _relay(self, answer: Answer, first: dict, events) -> None:
        write = self.handler.wfile
        if answer.call.chat:
            write.write(answer.chunk(None, role=True))
        event = first
        while event is not None:
            if "error" in event:
                write.write(b"data: " + self.failed(400, json.dumps(event).encode()).body() + b"\n\n")
                return
            text = answer.take(event)
            if text:
                write.write(answer.chunk(text))
                write.flush()
            if answer.cutter.stopped:
                break
            event = next(events, None)
        rest = answer.cutter.flush()
        if rest:
            write.write(answer.chunk(rest))
        write.write(answer.chunk(None, finish=answer.finish_reason()))
        write.write(b"data: [DONE]\n\n")
        write.flush()

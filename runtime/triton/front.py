"""The HTTP front: what clients reach on the public HTTP port, in front of tritonserver's own.

Why a front and not a tritonserver option: Triton 2.51 has no limit on HTTP input size (the
--http-max-input-size option came later), and its JSON parser is where hostile bodies hurt
(issue 14, measured on the bundled server): a few MB of nested `[` kill the process with signal
11, a body of 400k keys holds the HTTP thread for minutes, a non-JSON body is a 500 and
`max_tokens` 10^12 wraps to a negative int32. So the front, in the `treespec serve` process:
- refuses a body over `max_body` bytes with 413 before reading it, and a body without a
  Content-Length (chunked) with 411;
- parses generate / generate_stream bodies itself and checks every field (runtime/triton/schema.py:
  400 with a one-line message), then forwards only the checked fields, re-serialised, so Triton
  never parses a client's JSON there; `output_ids` always goes back as a list;
- answers infer itself (400: Triton's HTTP infer cannot serve a decoupled model; it said 501);
- forwards health and metadata GETs; model control, shared memory, logging and trace are not
  reachable through it (403), so no client can unload the model;
- answers 503 (Retry-After) while tritonserver restarts, and 408 when a request ran out of its
  own deadline; at most `max_connections` connections at a time (more get 503 at once);
- answers the OpenAI protocol too (/v1/completions, /v1/chat/completions, /v1/models: runtime/triton/openai.py),
  translated into the same checked generate requests.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from treespec.errors import InputError
from treespec.runtime.triton.client_watch import ClientWatch, mark_cancelled, new_request_id, shut_down
from treespec.runtime.triton.openai import (CHAT, COMPLETIONS, MODELS, OpenAIError, OpenAIOptions, OpenAIRelay,
                                            models_body, parse_call)
from treespec.runtime.triton.schema import DEADLINE_MESSAGE, MAX_BODY_BYTES, MAX_TIMEOUT_S, check_request

GENERATE = re.compile(r"/v2/models/([A-Za-z0-9_.-]+)(/versions/[0-9]+)?/(generate|generate_stream|infer)")
READABLE = re.compile(r"/v2(/health/(live|ready)|/models/[A-Za-z0-9_.-]+(/versions/[0-9]+)?(/ready|/config|/stats)?)?")
UPSTREAM_MODEL = "treespec"  # the orchestrator's name in the repository (exporter/triton_repo.py)
RESTARTING = "is not healthy"  # Triton's answer (a 400) while a dead model instance is being replaced
DRAIN_BYTES = 64 << 20  # of an oversize body, read and dropped after the 413 (then the connection closes)
UPSTREAM_SLACK_S = 60.0  # beyond a request's deadline; the supervisor kills a stuck stub before this


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"


def error_reply(status: int, message: str) -> Reply:
    return Reply(status, json.dumps({"error": message}).encode())


def as_list_ids(event: dict) -> dict:
    """Triton's generate endpoints give a one-element output as a scalar: output_ids is always a list."""
    if "output_ids" in event and not isinstance(event["output_ids"], list):
        event["output_ids"] = [event["output_ids"]]
    return event


def upstream_error(status: int, body: bytes) -> Reply:
    """A Triton error, with the status that says what happened (408: deadline; 503: restarting)."""
    try:
        message = str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError):
        message = body.decode("utf-8", "replace")[:200]
    if message.startswith(DEADLINE_MESSAGE):
        return error_reply(408, message)
    if RESTARTING in message:
        return error_reply(503, f"the model is restarting, retry in a moment ({message})")
    return error_reply(status, message)


def parse_json(blob: bytes, what: str):
    try:
        return json.loads(blob)
    except RecursionError:
        raise InputError(f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} is not JSON: {str(exc)[:120]}") from None


class FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "FrontServer"

    # plumbing ----------------------------------------------------------------------------------
    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        pass

    def send_error(self, code, message=None, explain=None) -> None:
        # the base class answers an unknown method with 501: a client's mistake is a 4xx here
        if code in (405, 501):
            code, message = 405, f"{str(self.command)[:20]} is not allowed here (GET or POST)"
        self.reply(error_reply(code, message or "bad request"), close=True)

    def reply(self, reply: Reply, close: bool = False, headers: dict | None = None) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def read_body(self) -> bytes | None:
        """The body within the size limit, or None after answering 411/413/400."""
        if self.headers.get("Transfer-Encoding"):
            self.reply(error_reply(411, "send the body with a Content-Length (chunked bodies are not taken)"),
                       close=True)
            return None
        length = self.headers.get("Content-Length", "0").strip()
        if not length.isdigit():
            self.reply(error_reply(400, "Content-Length must be a non-negative integer"), close=True)
            return None
        if int(length) > self.server.max_body:
            self.refuse_large(int(length))
            return None
        return self.rfile.read(int(length))

    def refuse_large(self, length: int) -> None:
        """413 first; then the body is read and dropped (up to DRAIN_BYTES, never kept), so that a client
        that sends its whole body before it reads gets the answer instead of a broken pipe."""
        self.reply(error_reply(413, f"the body has {length} bytes; the limit is {self.server.max_body}"), close=True)
        left = min(length, DRAIN_BYTES)
        try:
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def handle_expect_100(self) -> bool:
        """A client that asks first (Expect: 100-continue, curl's way for large bodies) is told at once."""
        length = self.headers.get("Content-Length", "0").strip()
        if length.isdigit() and int(length) > self.server.max_body:
            self.reply(error_reply(413, f"the body has {int(length)} bytes; the limit is {self.server.max_body}"),
                       close=True)
            return False
        return super().handle_expect_100()

    # routes ------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        if self.headers.get("Content-Length", "0").strip() != "0" or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a body on a GET is not read: the connection cannot be reused
        if self.path.split("?", 1)[0] == MODELS:
            self.reply(Reply(200, models_body(self.server.openai)))
            return
        if not READABLE.fullmatch(self.path.split("?", 1)[0]):
            self.reply(error_reply(403 if self.path.startswith("/v2") else 404,
                                   f"{self.path[:80]} is not available on this port"), close=True)
            return
        self.reply(self.forward_get(self.path))

    def do_POST(self) -> None:
        if self.path in (COMPLETIONS, CHAT):
            self.openai(self.path == CHAT)
            return
        match = GENERATE.fullmatch(self.path)
        if match is None:
            self.reply(error_reply(403 if self.path.startswith("/v2") else 404,
                                   f"POST {self.path[:80]} is not available on this port"), close=True)
            return
        body = self.read_body()
        if body is None:
            return
        try:
            if match.group(3) == "infer":
                raise InputError("the HTTP infer endpoint cannot serve a decoupled (streaming) model: use "
                                 "generate, generate_stream or gRPC")
            self.generate(body, match.group(3) == "generate_stream")
        except InputError as exc:
            self.reply(error_reply(400, str(exc)))

    def do_PUT(self) -> None:
        self.send_error(405)

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    def do_HEAD(self) -> None:
        self.send_error(405)

    # forwarding --------------------------------------------------------------------------------
    def forward_get(self, path: str) -> Reply:
        try:
            response = self._send("GET", path, None, {}, 30.0)
            data = response.read()
        except (http.client.HTTPException, OSError) as exc:  # OSError: refused, reset, timed out
            return self.unreachable(exc)
        if response.status >= 400:
            return upstream_error(response.status, data)
        return Reply(response.status, data, response.getheader("Content-Type", "application/json"))

    def _send(self, method: str, path: str, body: bytes | None, headers: dict, timeout: float):
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=timeout)
        self.upstream_conn = conn  # what watch_client shuts down when the client leaves
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse()

    def watch_client(self) -> ClientWatch:
        """While a generate request runs: a client that leaves cancels it in the model (client_watch.py).
        Sets the id that the upstream request carries (`request_id`)."""
        self.request_id = new_request_id()

        def left() -> None:
            mark_cancelled(self.server.cancel_dir(), self.request_id)
            shut_down(getattr(self, "upstream_conn", None))

        return ClientWatch(self.connection, left)

    @staticmethod
    def unreachable(exc: Exception) -> Reply:
        if isinstance(exc, socket.timeout):
            return error_reply(504, "no answer from the model within the request's deadline")
        return error_reply(503, "the server is restarting, retry in a moment")

    def generate(self, body: bytes, streaming: bool) -> None:
        values = parse_json(body, "the body")
        if not isinstance(values, dict):
            raise InputError("the body must be a JSON object")
        if values.get("stream") is True and not streaming:
            raise InputError("stream=true needs the generate_stream endpoint")
        req = check_request(values, self.server.max_timeout)
        headers = {"Content-Type": "application/json"}
        timeout = req.timeout + UPSTREAM_SLACK_S
        with self.watch_client() as watch:
            data = json.dumps({**req.to_json(), "id": self.request_id}).encode()
            self._forward_generate(data, headers, timeout, streaming, watch)

    def _forward_generate(self, data: bytes, headers: dict, timeout: float, streaming: bool,
                          watch: ClientWatch) -> None:
        try:
            response = self._send("POST", self.path, data, headers, timeout)
            if response.status >= 400 or not streaming:
                payload = response.read()
        except (http.client.HTTPException, OSError) as exc:
            if not watch.left:
                self.reply(self.unreachable(exc))
            return
        if response.status >= 400:
            self.reply(upstream_error(response.status, payload))
        elif not streaming:
            self.reply(Reply(200, json.dumps(as_list_ids(json.loads(payload))).encode()))
        else:
            self.relay_events(response)

    def openai(self, chat: bool) -> None:
        """An OpenAI request: checked, sent as a generate request, answered in OpenAI's objects."""
        body = self.read_body()
        if body is None:
            return
        relay = OpenAIRelay(self, self.server.openai, upstream_error, UPSTREAM_SLACK_S)
        try:
            try:
                call = parse_call(parse_json(body, "the body"), chat, self.server.openai)
            except InputError as exc:
                raise OpenAIError(400, str(exc)) from None
            path = f"/v2/models/{UPSTREAM_MODEL}/{'generate_stream' if call.request.stream else 'generate'}"
            with self.watch_client():
                if call.request.stream:
                    relay.stream(call, path)
                else:
                    self.reply(Reply(200, relay.whole(call, path)))
        except OpenAIError as exc:
            self.reply(Reply(exc.status, exc.body()))
        except (http.client.HTTPException, OSError) as exc:
            reply = self.unreachable(exc)
            self.reply(Reply(reply.status, OpenAIError(reply.status, json.loads(reply.body)["error"]).body()))

    def relay_events(self, response) -> None:
        """Server-sent events, one per decoding step, passed on as they come (then the connection closes)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        try:
            for line in response:
                if line.startswith(b"data: "):
                    event = json.loads(line[len(b"data: "):])
                    if isinstance(event, dict) and str(event.get("error", "")).startswith(DEADLINE_MESSAGE):
                        event["status"] = 408
                    line = b"data: " + json.dumps(as_list_ids(event)).encode() + b"\n"
                self.wfile.write(line)
                self.wfile.flush()
        except (http.client.HTTPException, OSError, ValueError):
            pass  # the client left, or tritonserver died mid-stream: the stream just ends


class FrontServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog (socketserver's default is 5): 64 clients connecting at once overflowed it
    # on the H200 (connections reset before accept); over max_connections they get a 503 instead.
    request_queue_size = 512

    def __init__(self, address: tuple[str, int], upstream: tuple[str, int], max_body: int = MAX_BODY_BYTES,
                 max_timeout: float = MAX_TIMEOUT_S, max_connections: int = 128, read_timeout: float = 30.0,
                 openai: OpenAIOptions | None = None, cancel_dir: Callable[[], Path | None] = lambda: None):
        handler = type("Handler", (FrontHandler,), {"timeout": read_timeout})  # a slow client's socket times out
        super().__init__(address, handler)
        self.upstream, self.max_body, self.max_timeout = upstream, max_body, max_timeout
        self.openai = openai or OpenAIOptions()
        self.cancel_dir = cancel_dir  # where a departed client's request is marked (the server's watch folder)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        pass  # a client that left mid-request: nothing to report, nothing to stop


class Front:
    """The front on host:port (0: a free port), forwarding to upstream (tritonserver's HTTP port)."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int], **options):
        self.server = FrontServer((host, port), upstream, **options)
        self.host, self.port = self.server.server_address[:2]
        self._thread = threading.Thread(target=self.server.serve_forever, name="triton-front", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "Front":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

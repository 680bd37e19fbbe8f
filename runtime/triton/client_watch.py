"""Notice a client that leaves while its request runs, and cancel the request in the model.

Why: the front relays a request to tritonserver over its own HTTP connection, and Triton cancels
a request when that connection closes (measured on 2.51: the model's `is_cancelled` turns true
within its next step, the batch slot is freed). But the front only learns that its client left
when a write to it fails, and nothing is written while a request waits for a batch slot or
between slow steps, so a departed client's request would still be admitted, prefilled and decoded
for nobody. So while a request runs, a watcher thread polls the client's socket: end of file (the
client closed) or an error (reset) shuts the upstream connection down, which is Triton's signal.

Triton 2.51 notices a closed connection only when it writes to it, so a request still waiting for
a slot would be admitted and decoded until its first response. So the front also tags every
generate request with an `id` (Triton passes it to the model as the request id) and, when the
client leaves, drops a marker `cancel-<id>` into the server's watch folder; the model's response
thread (runtime/triton/inflight.py) looks for it with the cancellation poll, before admission too.
"""
from __future__ import annotations

import os
import re
import select
import socket
import threading
import uuid
from pathlib import Path
from typing import Callable

POLL_S = 0.02
MARKER = "cancel-"
REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # the ids the front gives (uuid4 hex); others are not looked up


def new_request_id() -> str:
    return uuid.uuid4().hex


def mark_cancelled(folder: Path | None, request_id: str) -> None:
    """Tell the model that the request `request_id` lost its client."""
    if folder is None or not REQUEST_ID.fullmatch(request_id):
        return
    try:
        (Path(folder) / f"{MARKER}{request_id}").touch()
    except OSError:
        pass


def take_cancelled(folder: str | None, request_id: str) -> bool:
    """In the model: True (and the marker removed) when the front marked this request cancelled."""
    if not folder or not REQUEST_ID.fullmatch(request_id or ""):
        return False
    try:
        os.unlink(os.path.join(folder, f"{MARKER}{request_id}"))
        return True
    except OSError:
        return False


class ClientWatch:
    """Context manager: while inside, `on_leave()` is called once if `client` closes its connection."""

    def __init__(self, client: socket.socket, on_leave: Callable[[], None], poll_s: float = POLL_S):
        self.client, self.on_leave, self.poll_s = client, on_leave, poll_s
        self.left = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="front-client-watch", daemon=True)

    def __enter__(self) -> "ClientWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        if not self.left and self._gone(0.0):  # the relay noticed first (a failed write): same signal
            self._leave()

    def _gone(self, wait_s: float) -> bool | None:
        """True: the client closed or reset; False: it sent more bytes; None: nothing to read yet."""
        try:
            readable, _, _ = select.select([self.client], [], [], wait_s)
            if not readable:
                return None
            return not self.client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except (OSError, ValueError):  # reset, or the socket is closed under us
            return True

    def _leave(self) -> None:
        self.left = True
        self.on_leave()

    def _watch(self) -> None:
        while not self._done.is_set():
            gone = self._gone(self.poll_s)
            if gone is None:
                continue
            if gone and not self._done.is_set():  # False: a pipelined request: the client is there
                self._leave()
            return


def shut_down(connection) -> None:
    """Close an http.client connection's socket both ways at once (wakes a thread blocked reading it)."""
    sock = getattr(connection, "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass

"""The service that `treespec serve` runs and the tests start: tritonserver, its supervisor and the
HTTP front, started and stopped together.

Clients reach the front's HTTP port (`http_port`), gRPC (`grpc_port`) and metrics; tritonserver's
own HTTP port is private (a free port on 127.0.0.1, used by the front and for model control).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from treespec.runtime.triton.env import ServerError
from treespec.runtime.triton.front import Front
from treespec.runtime.triton.openai import OpenAIOptions
from treespec.runtime.triton.schema import MAX_BODY_BYTES
from treespec.runtime.triton.server import HOST, TritonServer
from treespec.runtime.triton.supervisor import Supervisor


class TritonService:
    """Use as a context manager. Ports of None are picked free."""

    def __init__(self, repo_dir: str | Path, http_port: int | None = 8000, grpc_port: int | None = 8001,
                 metrics_port: int | None = 8002, log_file: str | Path | None = None,
                 startup_timeout: float = 600.0, exit_timeout: int = 30, max_body: int = MAX_BODY_BYTES,
                 supervise_interval: float = 1.0, grace_s: float = 5.0, backoff_s: float = 1.0,
                 on_event: Callable[[str], None] | None = None, models: Sequence[str] = ("treespec",),
                 openai: OpenAIOptions | None = None):
        self.server = TritonServer(repo_dir, None, grpc_port, metrics_port, models=models, log_file=log_file,
                                   startup_timeout=startup_timeout, exit_timeout=exit_timeout)
        self.supervisor = Supervisor(self.server, interval=supervise_interval, grace_s=grace_s,
                                     backoff_s=backoff_s, on_event=on_event)
        self._port, self._max_body, self._openai = http_port or 0, max_body, openai
        self.front: Front | None = None

    @property
    def http_url(self) -> str:
        return self.front.url if self.front else f"http://{HOST}:{self._port}"

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url

    def start(self) -> "TritonService":
        # the public port first: a port in use is refused before the model loads
        try:
            self.front = Front(HOST, self._port, (HOST, self.server.http_port), max_body=self._max_body,
                               openai=self._openai, cancel_dir=lambda: self.server.watch_dir)
        except OSError as exc:
            raise ServerError(f"cannot listen on {HOST}:{self._port} ({exc.strerror}): choose another --port "
                              "or stop what uses it") from None
        try:
            self.server.start()
        except BaseException:
            self.front.server.server_close()
            raise
        self.front.start()
        self.supervisor.start()
        return self

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the supervisor, then tritonserver (SIGTERM, in-flight requests finish), then the front."""
        self.supervisor.stop()
        code = self.server.stop(timeout)
        if self.front is not None:
            self.front.stop()
        return code

    def kill(self) -> int | None:
        self.supervisor.stop()
        code = self.server.kill()
        if self.front is not None:
            self.front.stop()
        return code

    def __enter__(self) -> "TritonService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.server.cleanup()

"""Keep a TritonServer serving, whatever its clients send: the supervisor thread.

Every `interval` seconds it looks at three things and repairs what broke, logging why:
- the tritonserver process itself. If it died (issue 14: tritonserver 2.51 died of signal 11 on
  one hostile HTTP body), it is started again on the same ports, after a back-off that doubles from
  `backoff_s` up to `max_backoff_s` while restarts keep failing, and is reset once the server has
  run `stable_s`. The event names the exit code or signal and the log's last error lines.
- the python backend stubs. Triton 2.51 does not restart the dead stub of a decoupled model (ours):
  the model stays "ready" and answers "Stub process ... is not healthy" forever, so it is reloaded.
- the deadlines that model instances write while they work (runtime/triton/model.py). A stub still
  on a request `grace_s` after its deadline is stuck inside one step (the model checks its deadline
  between steps): it is killed, and the reload above gives the next request a fresh instance.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from treespec.files import read_json_or_empty
from treespec.runtime.triton.env import ServerError
from treespec.runtime.triton.server import TritonServer


def exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """A daemon thread watching one TritonServer; start() after the server is ready, stop() before it."""

    def __init__(self, server: TritonServer, interval: float = 1.0, grace_s: float = 5.0,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, stable_s: float = 60.0,
                 on_event: Callable[[str], None] | None = None):
        self.server = server
        self.interval, self.grace_s = interval, grace_s
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self.on_event = on_event
        self.events: list[str] = []
        self.kills = 0  # stubs killed past a deadline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._known: set[int] = set()

    def start(self) -> "Supervisor":
        self._stop.clear()
        self._known = set(self.server.stub_pids())
        self._thread = threading.Thread(target=self._run, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)

    def event(self, message: str) -> None:
        self.events.append(message)
        if self.on_event is not None:
            self.on_event(message)

    def _halted(self) -> bool:
        return self._stop.is_set() or self.server.stopping.is_set()

    def _run(self) -> None:
        up_since = time.monotonic()
        delay = self.backoff_s
        while not self._stop.wait(self.interval) and not self._halted():
            if not self.server.alive():
                if self._restart(delay):
                    up_since, delay = time.monotonic(), self.backoff_s
                else:
                    delay = min(2 * delay, self.max_backoff_s)
                continue
            if time.monotonic() - up_since > self.stable_s:
                delay = self.backoff_s
            self._kill_overdue()
            self._reload_after_stub_deaths()

    def _restart(self, delay: float) -> bool:
        """One restart attempt after `delay` seconds; True when the server is ready again."""
        code = self.server.proc.returncode if self.server.proc is not None else None
        errors = [line for line in self.server.error_lines() if "Traceback" not in line][-3:]
        self.event(f"tritonserver died ({exit_reason(code)}); restarting it in {delay:g} s"
                   + (f"; last errors: {' | '.join(errors)}" if errors else ""))
        if self._stop.wait(delay) or self._halted():
            return False
        t0 = time.perf_counter()
        try:
            self.server.restart()
        except ServerError as exc:
            if not self._halted():
                self.event(f"restart failed: {str(exc).splitlines()[0]}")
            return False
        self._known = set(self.server.stub_pids())
        self.event(f"tritonserver restarted in {time.perf_counter() - t0:.1f} s "
                   f"(restart {self.server.restarts}); serving again")
        return True

    def _reload_after_stub_deaths(self) -> None:
        current = set(self.server.stub_pids())
        dead = self._known - current
        if dead and not self._halted():
            models = ", ".join(self.server.models)
            self.event(f"python backend stub(s) {sorted(dead)} died; reloading {models}")
            try:
                for model in self.server.models:
                    self.server.reload(model)
                self.event(f"reloaded {models}")
            except ServerError as exc:
                self.event(f"reload failed: {exc}")
            current = set(self.server.stub_pids())
        self._known = current

    def _kill_overdue(self) -> None:
        watch = self.server.watch_dir
        if watch is None or not watch.is_dir():
            return
        now = time.monotonic()
        stubs = set(self.server.stub_pids())
        for entry in watch.glob("*.json"):
            state = read_json_or_empty(entry)
            deadline, pid = state.get("deadline"), state.get("pid")
            if not isinstance(deadline, (int, float)) or pid not in stubs or now <= deadline + self.grace_s:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            entry.unlink(missing_ok=True)
            self.kills += 1
            self.event(f"stub {pid} ({state.get('instance')}) held a request {now - deadline:.1f} s past its "
                       "deadline; killed it (the model is reloaded for the next request)")


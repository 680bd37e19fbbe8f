"""Run a real Triton Inference Server (the `tritonserver` bundled in the `nvidia-pytriton` wheel).

`TritonServer(repo_dir)` is the process: start, wait until ready, restart, stop, logs, the python
backend stubs under it, a model reload. What keeps it serving (restarts with back-off, reloads,
killing a stub stuck past a request's deadline) is runtime/triton/supervisor.py; what stands in
front of its HTTP port is runtime/triton/front.py; runtime/triton/service.py puts the three
together, and `treespec serve` (runtime/commands/serve.py) runs that.

Only the `treespec` model is loaded (`--model-control-mode explicit`): the per-graph models in the
repository need Triton's onnxruntime/tensorrt backends, which the wheel does not ship. The model
repository, shared-memory, logging and trace APIs need a header with a key only this process knows
(--http-restricted-api / --grpc-restricted-protocol): no client can unload the model. How the
bundled server is made to run our python model: treespec.runtime.triton.env.
"""
from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from treespec.runtime.triton.env import WATCH_ENV, ServerError, TritonInstall, stage_stub_numpy

HOST = "127.0.0.1"
ADMIN_HEADER = "treespec-admin"
RESTRICTED = "model-repository,shared-memory,logging,trace"


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started the server dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


class TritonServer:
    """A tritonserver process on 127.0.0.1 serving `repo_dir`; use as a context manager.

    Ports of None are picked free. `models` are loaded explicitly (the default: `treespec`).
    """

    def __init__(self, repo_dir: str | Path, http_port: int | None = 8000, grpc_port: int | None = 8001,
                 metrics_port: int | None = 8002, models: Sequence[str] = ("treespec",),
                 log_file: str | Path | None = None, startup_timeout: float = 600.0,
                 exit_timeout: int = 30, log_verbose: int = 0, extra_args: Sequence[str] = ()):
        self.repo_dir = Path(repo_dir).resolve()
        if not self.repo_dir.is_dir():
            raise ServerError(f"model repository {self.repo_dir} does not exist (write it with treespec triton-repo)")
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.models = list(models)
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self._workdir: Path | None = None
        self.log_file = Path(log_file) if log_file else None
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.reloads = 0
        self.restarts = 0
        self.stopping = threading.Event()  # set by stop()/kill(): a supervisor must not restart then
        self._admin_key = secrets.token_hex(16)
        self._process_lock = threading.Lock()  # no new process once stop()/kill() began

    # endpoints -----------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self, backend_dir: Path) -> list[str]:
        cmd = [str(self.install.server_bin), f"--model-repository={self.repo_dir}",
               f"--backend-directory={backend_dir}",
               f"--http-address={HOST}", f"--http-port={self.http_port}",
               f"--grpc-address={HOST}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={HOST}", f"--metrics-port={self.metrics_port}",
               "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
               "--model-control-mode=explicit", "--strict-readiness=true",
               f"--exit-timeout-secs={self.exit_timeout}", f"--log-verbose={self.log_verbose}",
               f"--log-file={self.log_file}",  # written unbuffered, unlike a redirected stdout
               "--pinned-memory-pool-byte-size=0",  # our python model does not use it; CPU hosts have none
               f"--http-restricted-api={RESTRICTED}:{ADMIN_HEADER}={self._admin_key}",
               f"--grpc-restricted-protocol={RESTRICTED}:{ADMIN_HEADER}={self._admin_key}"]
        cmd += [f"--load-model={m}" for m in self.models]
        return cmd + self.extra_args

    # lifecycle -----------------------------------------------------------------------------
    @property
    def watch_dir(self) -> Path | None:
        return self._workdir / "watch" if self._workdir else None

    def start(self) -> "TritonServer":
        self.install = TritonInstall()
        self.stopping.clear()
        busy = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if _port_in_use(p)]
        if busy:
            raise ServerError(f"port(s) {', '.join(map(str, busy))} on {HOST} are already in use: "
                              "choose others (--port/--grpc-port/--metrics-port) or stop what uses them")
        self._workdir = Path(tempfile.mkdtemp(prefix="treespec-triton-"))
        self._backend_dir = self.install.backend_dir(self._workdir / "backends")
        stage_stub_numpy(self._workdir)
        self.watch_dir.mkdir()
        if self.log_file is None:
            self.log_file = self._workdir / "tritonserver.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.console_file = self._workdir / "console.log"  # stdout/stderr: stub crashes, fatal errors
        try:
            self._launch()
        except BaseException:
            self.stop()
            self.cleanup(keep_logs=True)  # the error names the log; everything else goes
            raise
        return self

    def _launch(self) -> None:
        """Start the process and wait until it is ready (start, restart)."""
        log = open(self.console_file, "ab")
        env = {**self.install.environment(), WATCH_ENV: str(self.watch_dir)}
        t0 = time.perf_counter()
        with self._process_lock:
            if self.stopping.is_set():
                log.close()
                raise ServerError("tritonserver is being stopped")
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the server in order.
            self.proc = subprocess.Popen(self.command(self._backend_dir), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=self._workdir,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        self.wait_ready(self.startup_timeout)
        self.startup_s = time.perf_counter() - t0

    def restart(self) -> None:
        """Start the process again after it died, on the same ports and repository. The previous
        log is kept as <log>.<n> (Triton truncates its log file at start). Raises ServerError."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.restarts += 1
        if self.log_file is not None and self.log_file.exists():
            self.log_file.replace(self.log_file.with_name(f"{self.log_file.name}.{self.restarts}"))
        for entry in self.watch_dir.iterdir():  # the dead stubs' deadlines
            entry.unlink(missing_ok=True)
        try:
            self._launch()
        except ServerError:
            if self.alive():
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            raise

    def _post(self, path: str, timeout: float, body: bytes = b"{}") -> tuple[int, str]:
        req = urllib.request.Request(self.http_url + path, data=body, method="POST",
                                     headers={ADMIN_HEADER: self._admin_key})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(exc)

    # Triton 2.51 does not restart the dead python-backend stub of a decoupled model (ours; checked):
    # the model stays "ready" and answers "Stub process ... is not healthy" forever; so a supervisor
    # reloads it.
    def reload(self, model: str = "treespec") -> None:
        """Load the model again: new stub processes. A plain load of an unchanged model is a no-op, so
        the model's own config goes along with one more parameter (`reload`); Triton then loads the
        new instances first and swaps them in, so the model never disappears meanwhile."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/models/{model}/config", timeout=30) as r:
                config = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ServerError(f"could not read the config of {model}: {exc}") from None
        config.setdefault("parameters", {})["reload"] = {"string_value": str(self.reloads + 1)}
        body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
        code, text = self._post(f"/v2/repository/models/{model}/load", self.startup_timeout, body)
        if code != 200:
            raise ServerError(f"could not load {model}: {code} {text}")
        self.reloads += 1

    def _get(self, path: str, timeout: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def is_ready(self) -> bool:
        return self._get("/v2/health/ready") == 200 and all(
            self._get(f"/v2/models/{m}/ready") == 200 for m in self.models)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode} while starting; "
                                  f"log {self.log_file}:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s; log {self.log_file}:\n{self.log_tail()}")

    def log_text(self) -> str:
        """The server log, then anything written to its stdout/stderr."""
        parts = []
        for path in (self.log_file, getattr(self, "console_file", None)):
            try:
                parts.append(Path(path).read_text(errors="replace") if path else "")
            except OSError:
                pass
        return "\n".join(p for p in parts if p)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    BENIGN = ("CudaDriverHelper has not been initialized",)  # logged at every start on a host without CUDA

    def error_lines(self) -> list[str]:
        """The log's error lines (Triton's `E<date> ...` lines, Python tracebacks), known-benign ones left out."""
        text = self.log_text().splitlines()
        return [line for line in text if (line[:1] == "E" and line[1:5].isdigit() or "Traceback" in line)
                and not any(b in line for b in self.BENIGN)]

    def stub_pids(self) -> list[int]:
        """Process ids of the python backend stubs (the models' processes) under this server."""
        if self.proc is None:
            return []
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"triton_python_backend_stub" in cmd:
                out.append(int(entry.name))
        return sorted(out)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton waits for in-flight requests up to exit_timeout), then SIGKILL."""
        code = None
        with self._process_lock:
            self.stopping.set()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout if timeout is not None else self.exit_timeout + 30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            code = self.proc.returncode
        return code

    def kill(self) -> int | None:
        """SIGKILL the server and its stubs at once."""
        with self._process_lock:
            self.stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        return self.proc.returncode if self.proc is not None else None

    def cleanup(self, keep_logs: bool = False) -> None:
        """Remove the temporary working directory (backend dir, numpy links, default log)."""
        if self._workdir is None:
            return
        if keep_logs:
            for entry in self._workdir.iterdir():
                if not entry.name.endswith(".log"):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        else:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()

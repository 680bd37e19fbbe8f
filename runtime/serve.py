"""Run a real Triton Inference Server (the `tritonserver` bundled in the `nvidia-pytriton` wheel).

`TritonServer(repo_dir)` is a context manager for programs and tests; `serve(artifact_dir)` is what
`treespec serve` runs: it writes (or reuses) the model repository, starts the server on 127.0.0.1,
prints the endpoints and blocks until Ctrl-C / SIGTERM, then stops the server cleanly.

What the bundled server needs, found by trying it (Triton 2.51 from nvidia-pytriton 0.7.0):
- the binary `pytriton/tritonserver/bin/tritonserver` finds its libraries through its RPATH
  (`nvidia_pytriton.libs/`); LD_LIBRARY_PATH gets that folder anyway, for the python stub.
- the python backend runs each model in a separate process, `triton_python_backend_stub`, which
  must sit next to `libtriton_python.so`. The wheel ships one stub per Python version under
  `python_backend_stubs/<ver>/`; we assemble a private backend directory (symlinked backend
  library and utils, the stub for this interpreter's version) instead of writing into the wheel.
- the stub embeds libpython3.X: we put this interpreter's own `libpython3.X.so` first on
  LD_LIBRARY_PATH so the stub runs the same CPython build (and standard library) as the venv.
- the stub does not see this venv's packages: the generated model.py adds them itself (see
  treespec.exporter.triton_repo).
- only the `treespec` model is loaded (`--model-control-mode explicit`): the per-graph models
  in the repository need Triton's onnxruntime/tensorrt backends, which this wheel does not ship.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from treespec.runtime.errors import TreespecError

HOST = "127.0.0.1"


class ServerError(TreespecError):
    """The Triton server is not installed, failed to start or died."""


STUB_NUMPY = "numpy==1.26.4"


def numpy_major() -> int:
    from importlib.metadata import version

    return int(version("numpy").split(".")[0])


def stub_numpy_target() -> Path:
    """Where `numpy<2` for the python backend stub lives (inside this environment)."""
    return Path(os.environ.get("TREESPEC_TRITON_NUMPY_DIR", Path(sys.prefix) / "treespec-triton-numpy"))


def stub_numpy_command() -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(stub_numpy_target()), STUB_NUMPY]


def stub_numpy_dir(install: bool = True) -> Path | None:
    """None when this environment's numpy is < 2 already; else a folder holding numpy<2."""
    if numpy_major() < 2:
        return None
    target = stub_numpy_target()
    if (target / "numpy" / "__init__.py").is_file():
        return target
    cmd = stub_numpy_command()
    if not install or os.environ.get("TREESPEC_NO_AUTO_INSTALL"):
        raise ServerError("the python backend stub of nvidia-pytriton needs numpy<2 (its pybind11 garbles "
                          f"numpy 2 arrays); install it once with: {' '.join(cmd)}")
    print(f"installing {STUB_NUMPY} for the Triton python backend stub: {' '.join(cmd)}", file=sys.stderr)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise ServerError(f"could not install {STUB_NUMPY} for the python backend stub ({' '.join(cmd)}):\n"
                          + done.stdout[-2000:])
    return target


def stage_stub_numpy(cwd: Path) -> None:
    """Make numpy<2 the first numpy the stub sees.

    The stub embeds Python in isolated mode (PYTHONPATH is ignored) and imports numpy before any
    model code runs; the first entry of its sys.path is its working directory, which it inherits
    from tritonserver. So numpy<2 is linked into the server's working directory.
    """
    numpy_dir = stub_numpy_dir()
    if numpy_dir is None:
        return
    for entry in numpy_dir.iterdir():
        if entry.name.startswith("numpy"):  # numpy, numpy.libs, numpy-1.26.4.dist-info
            link = cwd / entry.name
            if not link.exists():
                link.symlink_to(entry)


def _pytriton_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("the Triton server is not installed: pip install --no-deps nvidia-pytriton==0.7.0")
    return Path(list(spec.submodule_search_locations)[0])


class TritonInstall:
    """Paths inside the nvidia-pytriton wheel."""

    def __init__(self, root: Path | None = None):
        root = root or _pytriton_root()
        base = root / "tritonserver"
        self.server_bin = base / "bin" / "tritonserver"
        self.libs_dir = root.parent / "nvidia_pytriton.libs"
        self.python_backend = base / "backends" / "python"
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        self.stub = base / "python_backend_stubs" / ver / "triton_python_backend_stub"
        for path, what in ((self.server_bin, "tritonserver binary"), (self.libs_dir, "bundled libraries"),
                           (self.python_backend / "libtriton_python.so", "python backend")):
            if not path.exists():
                raise ServerError(f"nvidia-pytriton is incomplete: its {what} ({path}) is missing; "
                                  "reinstall it with pip install --no-deps --force-reinstall nvidia-pytriton")
        if not self.stub.exists():
            raise ServerError(f"nvidia-pytriton has no python backend stub for Python {ver} ({self.stub})")

    def backend_dir(self, dest: Path) -> Path:
        """A backend directory whose python backend has this interpreter's stub beside it."""
        py = dest / "python"
        py.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            link = py / name
            if not link.exists():
                link.symlink_to(self.python_backend / name)
        stub = py / "triton_python_backend_stub"
        if not stub.exists():
            shutil.copy2(self.stub, stub)
        return dest

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        libdirs = [str(self.libs_dir)]
        pylib = sysconfig.get_config_var("LIBDIR")
        if pylib and list(Path(pylib).glob(f"libpython{sys.version_info.major}.{sys.version_info.minor}*.so*")):
            libdirs.insert(0, pylib)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env


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
               f"--exit-timeout-secs={self.exit_timeout}", f"--log-verbose={self.log_verbose}"]
        cmd += [f"--load-model={m}" for m in self.models]
        return cmd + self.extra_args

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> "TritonServer":
        self.install = TritonInstall()
        busy = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if _port_in_use(p)]
        if busy:
            raise ServerError(f"port(s) {', '.join(map(str, busy))} on {HOST} are already in use: "
                              "choose others (--port/--grpc-port/--metrics-port) or stop what uses them")
        self._workdir = Path(tempfile.mkdtemp(prefix="treespec-triton-"))
        backend_dir = self.install.backend_dir(self._workdir / "backends")
        stage_stub_numpy(self._workdir)
        if self.log_file is None:
            self.log_file = self._workdir / "tritonserver.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command(backend_dir), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.install.environment(),
                                     cwd=self._workdir, start_new_session=True)
        log.close()
        try:
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _get(self, path: str, timeout: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return 0

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
        try:
            return Path(self.log_file).read_text(errors="replace") if self.log_file else ""
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

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

    def cleanup(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()


# `treespec serve` --------------------------------------------------------------------------------
def serve(artifact_dir: str | Path, port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
          repo_dir: str | Path | None = None, backend: str = "onnxruntime", device: str = "cpu",
          instances: int = 1, threads: int | None = None, startup_timeout: float = 600.0,
          log_file: str | Path | None = None) -> int:
    """Write or reuse the model repository, run the server until Ctrl-C / SIGTERM. Returns 0."""
    from treespec.exporter.triton_repo import default_repo_dir, ensure_triton_repo

    repo = Path(repo_dir) if repo_dir else default_repo_dir(artifact_dir, backend, device)
    reused = ensure_triton_repo(artifact_dir, repo, backend=backend, device=device, instances=instances,
                                threads=threads)
    print(f"model repository: {repo} ({'reused' if reused else 'written'})", flush=True)
    server = TritonServer(repo, port, grpc_port, metrics_port, log_file=log_file, startup_timeout=startup_timeout)
    stopping = {"signal": None}

    def on_signal(signum, frame):
        stopping["signal"] = signum
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        print("starting tritonserver (loading the model)...", flush=True)
        server.start()
        print(f"ready in {server.startup_s:.1f} s\n"
              f"  HTTP     {server.http_url}   (POST /v2/models/treespec/generate, /generate_stream)\n"
              f"  gRPC     {server.grpc_url}\n"
              f"  metrics  {server.metrics_url}\n"
              f"  log      {server.log_file}\n"
              "Ctrl-C stops the server.", flush=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
        raise ServerError(f"tritonserver exited unexpectedly (code {server.proc.returncode}); "
                          f"log {server.log_file}:\n{server.log_tail()}")
    except KeyboardInterrupt:
        print("stopping tritonserver (waiting for in-flight requests)...", flush=True)
        code = server.stop()
        print(f"stopped (exit code {code})", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
        server.cleanup()


def add_arguments(p) -> None:
    """Arguments of `treespec serve` (the CLI's command module can re-export this and `run`)."""
    p.add_argument("--artifacts", required=True, type=Path, help="artifact directory from treespec-export")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--repo", type=Path, help="model repository to write or reuse (default: a cache folder)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "tensorrt-rtx"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--instances", type=int, default=1, help="model instances (processes) serving requests")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per instance")
    p.add_argument("--log-file", type=Path, help="tritonserver log (default: a temporary file)")


def run(args) -> int:
    return serve(args.artifacts, args.port, args.grpc_port, args.metrics_port, args.repo, args.backend,
                 args.device, args.instances, args.threads, log_file=args.log_file)

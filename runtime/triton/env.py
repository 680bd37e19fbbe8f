"""What the `tritonserver` bundled in the `nvidia-pytriton` wheel needs to run our python model.

Found by trying it (Triton 2.51 from nvidia-pytriton 0.7.0):
- the binary finds its libraries through its RPATH (`nvidia_pytriton.libs/`); LD_LIBRARY_PATH
  gets that folder anyway, for the python backend stub.
- the python backend runs each model instance in a separate process, `triton_python_backend_stub`,
  which must sit next to `libtriton_python.so`. The wheel ships one stub per Python version under
  `python_backend_stubs/<ver>/`; we assemble a private backend directory (symlinked backend
  library and utils, a copy of the stub for this interpreter's version) instead of writing into
  the wheel.
- the stub embeds libpython3.X: this interpreter's own `libpython3.X.so` goes first on
  LD_LIBRARY_PATH, so the stub runs the same CPython build and standard library as the venv.
- the stub embeds Python in isolated mode: PYTHONPATH is ignored, so it does not see this venv.
  The model.py that Triton loads adds the venv's package folders itself (runtime/triton/repo_model.py).
- the stub's pybind11 predates numpy 2: with numpy 2 it misreads every array's item size, so
  tensors arrive garbled (BYTES inputs crash it). It imports numpy before any model code runs,
  from the first entry of its sys.path, its working directory (inherited from tritonserver): so
  numpy<2, kept in a folder of its own inside this environment, is linked into the server's
  working directory. numpy 1.26 runs torch, onnxruntime and transformers fine (tested).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

from treespec.errors import TreespecError


class ServerError(TreespecError):
    """The Triton server is not installed, failed to start or died."""


STUB_NUMPY = "numpy==1.26.4"
# The folder where model instances write the deadline of the request they work on (runtime/triton/
# model.py), for the supervisor (runtime/triton/supervisor.py); tritonserver passes it to its stubs.
WATCH_ENV = "TREESPEC_TRITON_WATCH"


def numpy_major() -> int:
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

"""The model.py that Triton loads: copied verbatim into <repo>/treespec/1/model.py by
treespec.exporter.triton_repo (as a data file: nothing imports this module).

The python backend stub runs its own embedded Python, which does not see the environment treespec
is installed in (PYTHONPATH is ignored). The parameter `python_path` in config.pbtxt records that
environment's package folders; they are put on sys.path (with their .pth files, so editable
installs work) before treespec.runtime.triton.model takes over. So this file uses the standard
library only, and imports treespec inside initialize, after the path is set up.
"""
import glob
import json
import os
import site
import sys

# Compiled packages that an environment with numpy 2 may hold only in builds for numpy 2 (scipy uses
# numpy 2 names at import), and that transformers imports whenever it finds them (scikit-learn, for
# its generation utilities).
NUMPY2_ONLY = ("scipy", "sklearn")


def _use_environment(config):
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    wanted = [p for p in json.loads(params.get("python_path", "[]")) if os.path.isdir(p)]
    # Like a venv without system site-packages: drop the stub interpreter's own package folders.
    keep = [p for p in sys.path if p not in wanted and not p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    sys.path[:] = keep[:1] + wanted + keep[1:]
    for folder in wanted:
        site.addsitedir(folder)  # runs .pth files (editable installs); folders already listed stay put
    _hide_numpy2_only_packages(wanted)


def _hide_numpy2_only_packages(wanted):
    """The stub runs numpy<2 (treespec.runtime.triton.env.stage_stub_numpy). Where the environment's own
    numpy is 2, its scipy cannot load under numpy 1 and transformers would fail importing it: a None
    entry in sys.modules makes importlib.util.find_spec answer None, so those packages count as absent."""
    numpy = sys.modules.get("numpy")
    if numpy is None or int(numpy.__version__.split(".")[0]) >= 2:
        return
    if any(glob.glob(os.path.join(folder, "numpy-2*.dist-info")) for folder in wanted):
        for name in NUMPY2_ONLY:
            sys.modules.setdefault(name, None)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        _use_environment(config)
        try:
            from treespec.runtime.triton.model import TreespecModel
        except ImportError as exc:
            where = config.get("parameters", {}).get("python_path", {}).get("string_value")
            raise RuntimeError(f"treespec cannot be imported from {where} ({exc}): install it in that "
                               "environment (pip install -e <treespec checkout>) or rewrite the repository "
                               "with treespec triton-repo from the environment it is installed in") from exc

        self._impl = TreespecModel()
        self._impl.initialize(args)

    def execute(self, requests):
        return self._impl.execute(requests)

    def finalize(self):
        impl = getattr(self, "_impl", None)
        if impl is not None:
            impl.finalize()

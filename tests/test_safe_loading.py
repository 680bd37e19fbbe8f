"""Safe loading (issue 8, item 3).

* Weights come only through safetensors or GGUF: a source scan of the project (exporter/, runtime/,
  plugins/, treespec_pkg/, tools/) fails on pickle-based loading (pickle/dill/joblib/shelve/
  marshal, torch.load without weights_only=True, np.load(allow_pickle=True), pandas.read_pickle,
  torch.jit.load), trust_remote_code, unsafe YAML, from_pretrained(use_safetensors=False) and
  eval()/exec(). The scanner is itself tested on code that does each of these.
* An HF folder with only pytorch_model.bin is refused, and nothing unpickles it (the .bin here is
  a pickle that would create a marker file if it were ever loaded).
* Paths in manifests are relative and resolve inside the artifact directory: absolute paths,
  ../ and symlinks leading out are refused with ArtifactError.
"""
from __future__ import annotations

import ast
import json
import pickle
import re
from pathlib import Path

import pytest

from treespec.artifacts import SCHEMA_VERSION
from treespec.errors import ArtifactError, InputError, ModelLoadError

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("exporter", "runtime", "plugins", "treespec_pkg", "tools")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


# -- the scanner -----------------------------------------------------------------------------------

def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_python(source: str, where: str) -> list[str]:
    """Unsafe loading / code execution in one Python file, as 'file:line: what' strings."""
    found: list[str] = []
    tree = ast.parse(source, filename=where)
    aliases: dict[str, str] = {}  # local name -> module.attr it was imported as
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    found.append(f"{where}:{node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"{where}:{node.lineno}: imports from {node.module}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases[head]}.{rest}" if head in aliases and rest else aliases.get(name, name)
        line = f"{where}:{node.lineno}"
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and full in ("eval", "exec"):
            found.append(f"{line}: {node.func.id}()")
        if full.split(".")[0] in PICKLE_MODULES and full.rsplit(".", 1)[-1] in ("load", "loads", "open", "Unpickler"):
            found.append(f"{line}: {full}()")
        if full == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
            found.append(f"{line}: torch.load() without weights_only=True")
        if full in ("torch.jit.load", "pandas.read_pickle", "pd.read_pickle", "torch.serialization.load"):
            found.append(f"{line}: {full}()")
        if full in ("numpy.load", "np.load") and not (_kw(node, "allow_pickle") is None
                                                      or _is_const(_kw(node, "allow_pickle"), False)):
            found.append(f"{line}: {full}(allow_pickle=...)")
        trust = _kw(node, "trust_remote_code")
        if trust is not None and not _is_const(trust, False):
            found.append(f"{line}: trust_remote_code")
        safetensors = _kw(node, "use_safetensors")
        if safetensors is not None and not _is_const(safetensors, True):
            found.append(f"{line}: use_safetensors is not True")
        if full in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            found.append(f"{line}: {full}()")
        if full == "yaml.load":
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or "Safe" not in _dotted(loader):
                found.append(f"{line}: yaml.load() without a SafeLoader")
    return found


SHELL_PATTERNS = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"trust_remote_code\s*=\s*True|--trust-remote-code"), "trust_remote_code"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec"),
]


def scan_text(text: str, where: str) -> list[str]:
    """Shell scripts (and the Python they embed): line-based patterns."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for pattern, what in SHELL_PATTERNS:
            if pattern.search(line):
                found.append(f"{where}:{number}: {what}")
    return found


def project_files() -> list[Path]:
    files = []
    for folder in SCANNED:
        root = REPO / folder
        assert root.is_dir(), f"{folder}/ is missing: update SCANNED"
        files += [p for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix in (".py", ".sh", ".bash", ".pyi", "")]
    return files


def test_project_source_has_no_unsafe_loading():
    files = project_files()
    assert sum(p.suffix == ".py" for p in files) > 30  # the scan really covers the project
    problems = []
    for path in files:
        text = path.read_text(errors="replace")
        where = str(path.relative_to(REPO))
        if path.suffix in (".py", ".pyi"):
            problems += scan_python(text, where)
        else:
            problems += scan_text(text, where)
    assert not problems, "unsafe loading or code execution:\n" + "\n".join(problems)


UNSAFE_SNIPPETS = {
    "import pickle\npickle.load(open('w', 'rb'))": ["imports pickle", "pickle.load()"],
    "from pickle import loads\nloads(b'')": ["imports from pickle", "pickle.loads()"],
    "import torch\ntorch.load('w.bin')": ["torch.load() without weights_only=True"],
    "import torch\ntorch.load('w.bin', weights_only=False)": ["torch.load() without weights_only=True"],
    "from torch import load as tl\ntl('w.bin')": ["torch.load() without weights_only=True"],
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)": ["numpy.load(allow_pickle=...)"],
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)": ["trust_remote_code"],
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', use_safetensors=False)": ["use_safetensors"],
    "eval(open('cfg').read())": ["eval()"],
    "exec(data)": ["exec()"],
    "import yaml\nyaml.load(text)": ["yaml.load() without a SafeLoader"],
    "import yaml\nyaml.unsafe_load(text)": ["yaml.unsafe_load()"],
    "import joblib\njoblib.load('m.pkl')": ["imports joblib", "joblib.load()"],
    "import torch\ntorch.jit.load('m.pt')": ["torch.jit.load()"],
}
SAFE_SNIPPETS = [
    "import torch\ntorch.load('w.pt', weights_only=True)",
    "import numpy as np\nnp.load('a.npy')\nnp.load('a.npy', allow_pickle=False)",
    "model.eval()\nmodule.to('cpu').eval()",
    "import yaml\nyaml.safe_load(text)\nyaml.load(text, Loader=yaml.SafeLoader)",
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', use_safetensors=True, trust_remote_code=False)",
    "from safetensors.torch import load_file\nload_file('w.safetensors')",
]


@pytest.mark.parametrize("snippet", list(UNSAFE_SNIPPETS))
def test_scanner_flags_unsafe_code(snippet):
    found = "\n".join(scan_python(snippet, "x.py"))
    for what in UNSAFE_SNIPPETS[snippet]:
        assert what in found, (snippet, found)


def test_scanner_accepts_safe_code():
    for snippet in SAFE_SNIPPETS:
        assert scan_python(snippet, "x.py") == [], snippet
    assert scan_text("python -c 'import torch; torch.load(p)'\n", "t.sh")
    assert not scan_text("python -c 'torch.load(p, weights_only=True)'\n# pickle.load(x) in a comment\n", "t.sh")


# -- pickled checkpoints are refused and never unpickled ---------------------------------------------

class _Tripwire:
    """Unpickling this creates `marker`: proof that nobody unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _pickled_bin(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(_Tripwire(marker)))
    return path


def test_hf_folder_with_only_pytorch_model_bin_is_refused(tmp_path):
    from treespec.models.checkpoint import load_checkpoint

    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "vocab_size": 32, "hidden_size": 8}))
    marker = tmp_path / "UNPICKLED"
    weights = _pickled_bin(folder / "pytorch_model.bin", marker)
    with pytest.raises(ModelLoadError, match=r"has no \*\.safetensors weights \(pickled \.bin checkpoints are refused"):
        load_checkpoint(str(folder))
    with pytest.raises(ModelLoadError, match=r"unsupported file type"):
        load_checkpoint(str(weights))
    pt = _pickled_bin(tmp_path / "model.pt", marker)
    with pytest.raises(ModelLoadError, match=r"unsupported file type"):
        load_checkpoint(str(pt))
    assert not marker.exists(), "a pickled checkpoint was unpickled"


def test_pickled_drafter_weights_are_refused(tmp_path):
    from treespec.models.drafter_models import load_weights

    marker = tmp_path / "UNPICKLED"
    fake = _pickled_bin(tmp_path / "medusa.safetensors", marker)
    with pytest.raises(InputError, match=r"not a readable safetensors file"):
        load_weights(fake)
    assert not marker.exists()


# -- manifest paths ---------------------------------------------------------------------------------

MODEL = {"num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "head_dim": 4, "hidden_size": 4,
         "vocab_size": 8, "max_context": 16}


def _artifact_dir(root: Path, tokenizer: str = "tokenizer", onnx: str = "target.onnx") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "target.onnx").write_bytes(b"")
    manifest = {"schema_version": SCHEMA_VERSION, "model": MODEL, "tokenizer": {"path": tokenizer},
                "graphs": {"target": {"onnx": onnx, "profile": {"batch": [1, 1, 1], "tree_tokens": [1, 1, 4]}}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.onnx", "sub/../../outside.onnx", "..",
                                  "tokenizer/../../outside"])
def test_manifest_paths_outside_the_directory_are_refused(tmp_path, path):
    from treespec.artifacts import load_manifest

    (tmp_path / "outside.onnx").write_bytes(b"")
    manifest = load_manifest(_artifact_dir(tmp_path / "art"))
    pattern = "must be relative" if path.startswith("/") else "points outside the artifact directory"
    with pytest.raises(ArtifactError, match=pattern):
        manifest.resolve(path)
    with pytest.raises(ArtifactError, match=pattern):
        manifest.require_file(path)


def test_manifest_symlink_leading_outside_is_refused(tmp_path):
    from treespec.artifacts import load_manifest

    (tmp_path / "secret.onnx").write_bytes(b"")
    root = _artifact_dir(tmp_path / "art")
    (root / "link.onnx").symlink_to(tmp_path / "secret.onnx")
    manifest = load_manifest(root)
    with pytest.raises(ArtifactError, match="points outside the artifact directory"):
        manifest.require_file("link.onnx")
    assert manifest.resolve("tokenizer/../target.onnx") == (root / "target.onnx").resolve()


@pytest.mark.parametrize("field,value", [("tokenizer", "/tmp"), ("tokenizer", "../tok"), ("onnx", "/x/target.onnx"),
                                         ("onnx", "../target.onnx")])
def test_runtime_refuses_manifest_paths_outside(tiny_artifacts, tmp_path, field, value):
    """End to end: the generator never opens a file named by an escaping manifest path."""
    import shutil

    from treespec.runtime.api import SpeculativeGenerator

    root = _artifact_dir(tmp_path / "art", **{field: value})
    shutil.rmtree(root / "tokenizer")  # a real tokenizer, so the onnx cases get past it
    shutil.copytree(tiny_artifacts / "tokenizer", root / "tokenizer")
    with pytest.raises(ArtifactError, match=r"must be relative|points outside the artifact directory"):
        SpeculativeGenerator.from_artifacts(root)


def test_exported_manifest_paths_are_relative_and_inside(tiny_artifacts):
    from treespec.artifacts import load_manifest

    manifest = load_manifest(tiny_artifacts)
    named: list[str] = []

    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key in ("onnx", "path", "file", "weights", "runtime_cache"):
            named.append(node)

    walk({k: v for k, v in manifest.to_dict().items() if k != "model"})  # model.source is provenance only
    assert "target.onnx" in named and "tokenizer" in named
    for rel in named:
        assert not Path(rel).is_absolute() and ".." not in Path(rel).parts, rel
        assert manifest.require_file(rel).is_relative_to(tiny_artifacts.resolve())


# -- inconsistent manifests: one ArtifactError line each, never a traceback ---------------------------

INCONSISTENT = {
    "graphs not an object": (lambda m: m.update(graphs=[]), r"'graphs' \(graph name -> entry\) must be an object"),
    "drafters a list": (lambda m: m.update(drafters=["lookup"]), r"'drafters' \(kind -> entry\) must be an object"),
    "unknown lookup option": (lambda m: m.update(drafters={"lookup": {"options": {"max_gram": 3}}}),
                              r"drafter 'lookup' has unknown options \['max_gram'\]"),
    "lookup option not an integer": (lambda m: m.update(drafters={"lookup": {"options": {"top_k": "4"}}}),
                                     r"drafter 'lookup' option 'top_k' must be an integer"),
    "unknown drafter field": (lambda m: m.update(drafters={"lookup": {"heads": 4}}),
                              r"drafter 'lookup' has unknown fields \['heads'\]"),
    "drafter names an absent graph": (lambda m: m.update(drafters={"draft": {"graph": "draft"}}),
                                      r"drafter 'draft' names graph 'draft', which the 'graphs' section lacks"),
    "draft deeper than the target": (lambda m: m["graphs"].update(draft={"onnx": "target.onnx", "dims": {"num_layers": 5}}),
                                     r"graph 'draft' has 5 layers, more than the target's 1"),
    "drafter and graph disagree": (lambda m: (m["graphs"].update(medusa={"onnx": "target.onnx", "num_heads": 4}),
                                              m.update(drafters={"medusa": {"graph": "medusa", "num_heads": 3}})),
                                   r"drafter 'medusa' says num_heads 3 but its graph 'medusa' says 4"),
    "default drafter absent": (lambda m: m.update(default_drafter="medusa"),
                               r"'default_drafter' names 'medusa', which 'drafters' lacks"),
    "default trees a list": (lambda m: m.update(default_trees=[]), r"'default_trees' .* must be an object"),
    "default tree not an object": (lambda m: m.update(default_trees={"lookup": "opt"}),
                                   r"'default_trees' entry 'lookup' must be an object"),
    "heads not a multiple of kv heads": (lambda m: m["model"].update(num_heads=3, num_kv_heads=2),
                                         r"num_heads 3 is not a multiple of num_kv_heads 2"),
    "profile range reversed": (lambda m: m["graphs"]["target"]["profile"].update(tree_tokens=[4, 1, 2]),
                               r"graph 'target' 'profile' 'tree_tokens' must be \[min, opt, max\]"),
    "engines not a list": (lambda m: m["graphs"]["target"].update(engines={}), r"graph 'target' 'engines' must be a list"),
    "engine record without file": (lambda m: m["graphs"]["target"].update(engines=[{"builder": "tensorrt"}]),
                                   r"engine record 'file' must be a non-empty string"),
    "another KV layout": (lambda m: m.update(kv_cache={"layout": "growing"}),
                          r"'kv_cache' layout 'growing' is not the fixed-capacity layout"),
    "torch weights without path": (lambda m: m.update(torch_weights={}), r"'torch_weights' 'path' must be a non-empty"),
    "model section a list": (lambda m: m.update(model=[1, 2]), r"'model' section is incomplete or invalid"),
    "schema_version a boolean": (lambda m: m.update(schema_version=True), r"has no schema_version"),
    "older schema": (lambda m: m.update(schema_version=1),
                     r"uses manifest schema 1, older than this treespec reads \(2\): re-export the artifacts with "
                     r"treespec-export"),
}


@pytest.mark.parametrize("case", list(INCONSISTENT))
def test_inconsistent_manifests_are_refused_in_one_line(tmp_path, case):
    from treespec.artifacts import load_manifest

    change, pattern = INCONSISTENT[case]
    root = _artifact_dir(tmp_path / "art")
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=pattern) as err:
        load_manifest(root)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(root / "manifest.json"))


def test_manifest_round_trips_through_the_dataclasses(tiny_artifacts):
    from treespec.artifacts import Manifest, load_manifest

    manifest = load_manifest(tiny_artifacts)
    on_disk = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert manifest.to_dict() == on_disk
    assert Manifest.from_dict(on_disk, tiny_artifacts) == manifest
    assert manifest.default_tree("medusa") == on_disk["default_trees"]["medusa"]  # the exporter's key
    assert manifest.default_tree(None) == {"policy": "none"}


def test_graph_with_another_layer_count_is_refused(tiny_artifacts, tmp_path):
    """The manifest says 3 layers, the ONNX graph has 2 (KV inputs): refused before any step."""
    import shutil

    from treespec.runtime.api import SpeculativeGenerator

    root = tmp_path / "art"
    shutil.copytree(tiny_artifacts, root, ignore=shutil.ignore_patterns("torch", "draft.onnx*", "medusa.onnx*"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["model"]["num_layers"] = 3
    manifest["graphs"] = {"target": manifest["graphs"]["target"]}
    manifest.update(drafters={"lookup": manifest["drafters"]["lookup"]}, default_drafter="lookup")
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"the 'target' graph has 2 layers of KV cache but the manifest says 3"):
        SpeculativeGenerator.from_artifacts(root, threads=1)

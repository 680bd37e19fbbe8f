"""manifest.json: the contract between the exporter and the runtime.

The runtime reads only the manifest and the files it names; every path in it is relative to the
artifact directory and must resolve inside it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treespec.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

KV_CACHE_CONTRACT = {
    "layout": "fixed-capacity",
    "shape": ["batch", "kv_heads", "capacity", "head_dim"],
    "length_input": "past_lengths",
    "new_rows_output": ["new_key_{i}", "new_value_{i}"],
    "note": (
        "Per layer one key and one value buffer; rows [0, past_lengths[b]) are valid. A step reads "
        "the buffers in place and returns K/V rows for its tree tokens only; the runtime copies "
        "just the accepted rows into the buffers."
    ),
}


@dataclass
class ModelDims:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelDims":
        try:
            return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest 'model' section is incomplete or invalid: {exc}") from None


@dataclass
class Manifest:
    root: Path
    data: dict[str, Any]
    dims: ModelDims = field(init=False)

    def __post_init__(self) -> None:
        self.dims = ModelDims.from_dict(self.data.get("model", {}))

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def graphs(self) -> dict[str, dict[str, Any]]:
        return self.data.get("graphs", {})

    def graph(self, name: str) -> dict[str, Any]:
        if name not in self.graphs:
            have = ", ".join(self.graphs) or "none"
            raise ArtifactError(f"{self.root}: the artifacts have no '{name}' graph (they have: {have})")
        return self.graphs[name]

    def resolve(self, relative: str) -> Path:
        """A path named in the manifest, refused if it leaves the artifact directory."""
        if Path(relative).is_absolute():
            raise ArtifactError(f"manifest path '{relative}' must be relative to the artifact directory")
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ArtifactError(f"manifest path '{relative}' points outside the artifact directory")
        return path

    def require_file(self, relative: str) -> Path:
        path = self.resolve(relative)
        if not path.exists():
            raise ArtifactError(f"{self.root}: file '{relative}' named in the manifest is missing")
        return path

    @property
    def tokenizer_dir(self) -> Path:
        return self.require_file(self.data["tokenizer"]["path"])

    @property
    def eos_token_ids(self) -> list[int]:
        return [int(t) for t in self.model.get("eos_token_ids", [])]

    @property
    def drafters(self) -> dict[str, dict[str, Any]]:
        """kind -> options, e.g. {"lookup": {...}, "medusa": {"graph": "medusa", ...}}."""
        return self.data.get("drafters", {"lookup": {}})

    @property
    def default_drafter(self) -> str:
        return self.data.get("default_drafter", next(iter(self.drafters), "none"))

    @property
    def default_tree(self) -> dict[str, Any]:
        return self.data.get("default_tree", {"policy": "none"})

    def save(self) -> None:
        write_manifest(self.root, self.data)


def write_manifest(root: Path, data: dict[str, Any]) -> Path:
    data = {"schema_version": SCHEMA_VERSION, **data}
    path = root / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def load_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    if not root.exists():
        raise ArtifactError(f"artifact directory {root} does not exist (create it with treespec-export)")
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST_NAME}: not a treespec artifact directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is corrupt (not valid JSON: {exc})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is corrupt (not a JSON object)")
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{path} has no schema_version")
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} uses manifest schema {version}, newer than this treespec understands "
            f"({SCHEMA_VERSION}): upgrade treespec or re-export the artifacts"
        )
    for key in ("model", "tokenizer", "graphs"):
        if key not in data:
            raise ArtifactError(f"{path} is missing its '{key}' section")
    _check_sections(path, data)
    return Manifest(root=root, data=data)


def _is_range(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            and value[0] <= value[1] <= value[2])


def _check_sections(path: Path, data: dict[str, Any]) -> None:
    """The fields the runtime indexes directly, so a hand-edited manifest fails with a message."""
    tokenizer = data["tokenizer"]
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("path"), str):
        raise ArtifactError(f"{path}: 'tokenizer' must be an object with a 'path' string")
    graphs = data["graphs"]
    if not isinstance(graphs, dict):
        raise ArtifactError(f"{path}: 'graphs' must be an object (graph name -> entry)")
    for name, entry in graphs.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("onnx"), str):
            raise ArtifactError(f"{path}: graph '{name}' must be an object with an 'onnx' file name")
        profile = entry.get("profile")
        if profile is None and name != "target":
            continue  # only the target's profile is read by the runtime; engine builds check theirs
        if not isinstance(profile, dict) or not all(_is_range(profile.get(k)) for k in ("batch", "tree_tokens")):
            raise ArtifactError(f"{path}: graph '{name}' needs a 'profile' with 'batch' and 'tree_tokens' "
                                "as [min, opt, max] positive integers")

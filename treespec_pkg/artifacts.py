"""manifest.json: the contract between the exporter and the runtime, as dataclasses.

The exporter builds these classes and writes them with `write_manifest`; the runtime gets them back
from `load_manifest` and reads attributes, never string keys, so both sides share one spelling of
every field. `from_dict` validates as it reads: a hand-edited, truncated or inconsistent manifest
fails with one ArtifactError line that names the field, never with a KeyError deep in a backend.

The runtime reads only the manifest and the files it names; every path in it is relative to the
artifact directory and must resolve inside it. Schema 2 made artifacts self-contained: the torch
backend's weights ship in the directory (`torch_weights`: an HF folder, config.json +
model.safetensors in the export precision) instead of the source checkpoint's path, so a copied
directory works on a machine that never saw the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from treespec import __version__
from treespec.artifact_entries import (DrafterEntry, EngineRecord, GraphEntry, KvCacheContract, ModelDims,
                                       ModelSection, Profile, TokenizerEntry, TorchWeights, _drop_none, _get,
                                       _obj, _opt, _require, _str)
from treespec.errors import ArtifactError
from treespec.files import read_json_object, write_json

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
__all__ = ["DrafterEntry", "EngineRecord", "GraphEntry", "KvCacheContract", "Manifest", "ModelDims", "ModelSection",
           "Profile", "TokenizerEntry", "TorchWeights", "load_manifest", "write_manifest"]


@dataclass
class Manifest:
    """What an artifact directory holds; `root` is where it was loaded from (not serialised)."""

    model: ModelSection
    tokenizer: TokenizerEntry
    graphs: dict[str, GraphEntry]
    drafters: dict[str, DrafterEntry] = field(default_factory=lambda: {"lookup": DrafterEntry()})
    default_drafter: str | None = None  # None: the first drafter
    default_trees: dict[str, dict[str, Any]] = field(default_factory=dict)  # drafter kind -> tree config
    kv_cache: KvCacheContract = field(default_factory=KvCacheContract)
    torch_weights: TorchWeights | None = None
    treespec_version: str | None = None
    export: dict[str, Any] = field(default_factory=dict)  # timings and sizes: informational
    root: Path = field(default=Path("."), compare=False)

    @property
    def dims(self) -> ModelDims:
        return self.model.dims

    def graph_dims(self, name: str) -> ModelDims:
        """The dims a decoder graph is shaped by: the target's, with the draft's own layer count."""
        layers = self.graph(name).num_layers
        return self.dims if layers is None else ModelDims(**{**self.dims.__dict__, "num_layers": layers})

    def graph(self, name: str) -> GraphEntry:
        if name not in self.graphs:
            have = ", ".join(self.graphs) or "none"
            raise ArtifactError(f"{self.root}: the artifacts have no '{name}' graph (they have: {have})")
        return self.graphs[name]

    def profile(self, name: str) -> Profile:
        profile = self.graph(name).profile
        if profile is None:
            raise ArtifactError(f"{self.root}: graph '{name}' has no profile in the manifest")
        return profile

    def drafter(self, kind: str) -> DrafterEntry:
        if kind not in self.drafters:
            raise ArtifactError(f"these artifacts have no '{kind}' drafter (they have: "
                                f"{', '.join(self.drafters) or 'none'}; add one with treespec-export --drafter)")
        return self.drafters[kind]

    def resolve(self, relative: str) -> Path:
        """A path named in the manifest, refused if it leaves the artifact directory."""
        if Path(relative).is_absolute():
            raise ArtifactError(f"manifest path '{relative}' must be relative to the artifact directory")
        path = self.root / relative
        if not _resolves_inside(path, self.root.resolve()):
            raise ArtifactError(f"manifest path '{relative}' points outside the artifact directory")
        return path.resolve()

    def require_file(self, relative: str) -> Path:
        path = self.resolve(relative)
        if not path.exists():
            raise ArtifactError(f"{self.root}: file '{relative}' named in the manifest is missing")
        if path.is_dir():
            self._refuse_links_out(path, relative)
        return path

    def _refuse_links_out(self, folder: Path, relative: str) -> None:
        """Files inside a named folder (the tokenizer's) must not be links that leave the directory."""
        root = self.root.resolve()
        for entry in folder.rglob("*"):
            if entry.is_symlink() and not _resolves_inside(entry, root):
                raise ArtifactError(f"{self.root}: '{relative}/{entry.relative_to(folder)}' is a link that points "
                                    "outside the artifact directory")

    @property
    def tokenizer_dir(self) -> Path:
        return self.require_file(self.tokenizer.path)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.model.eos_token_ids)

    @property
    def default_drafter_kind(self) -> str:
        return self.default_drafter or next(iter(self.drafters), "none")

    def default_tree(self, kind: str | None) -> dict[str, Any]:
        """The exporter's tree config for drafter `kind` (plain decoding for none or unknown)."""
        return self.default_trees.get(kind or "none", {"policy": "none"})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "treespec_version": self.treespec_version,
            "model": self.model.to_dict(), "tokenizer": self.tokenizer.to_dict(), "kv_cache": self.kv_cache.to_dict(),
            "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
            "drafters": {k: d.to_dict() for k, d in self.drafters.items()},
            "default_drafter": self.default_drafter, "default_trees": self.default_trees,
            "torch_weights": self.torch_weights.to_dict() if self.torch_weights else None, "export": self.export}
        return _drop_none(out)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], root: Path = Path(".")) -> "Manifest":
        for key in ("model", "tokenizer", "graphs"):
            _require(key in data, f"is missing its '{key}' section")
        graphs = _obj(data["graphs"], "'graphs' (graph name -> entry)")
        drafters = _obj(data.get("drafters", {"lookup": {}}), "'drafters' (kind -> entry)")
        trees = _obj(_get(data, "default_trees", {}), "'default_trees' (drafter kind -> tree config)")
        for kind, tree in trees.items():
            _obj(tree, f"'default_trees' entry '{kind}'")
        manifest = cls(
            model=ModelSection.from_dict(data["model"]), tokenizer=TokenizerEntry.from_dict(data["tokenizer"]),
            graphs={name: GraphEntry.from_dict(name, entry) for name, entry in graphs.items()},
            drafters={kind: DrafterEntry.from_dict(kind, entry) for kind, entry in drafters.items()},
            default_drafter=_opt(data, "default_drafter", _str, "'default_drafter'"),
            default_trees={k: dict(v) for k, v in trees.items()},
            kv_cache=KvCacheContract.from_dict(_get(data, "kv_cache", {})),
            torch_weights=TorchWeights.from_dict(data["torch_weights"]) if data.get("torch_weights") is not None else None,
            treespec_version=data.get("treespec_version"), export=dict(_obj(_get(data, "export", {}), "'export'")),
            root=root)
        _check_consistent(manifest)
        return manifest

    def save(self) -> None:
        write_manifest(self.root, self)


def _check_consistent(m: Manifest) -> None:
    """Cross-field checks: what names a graph has it, layer and head counts agree."""
    for kind, spec in m.drafters.items():
        if spec.graph is not None:
            _require(spec.graph in m.graphs, f"drafter '{kind}' names graph '{spec.graph}', which the "
                     f"'graphs' section lacks (it has: {', '.join(m.graphs) or 'none'})")
            graph = m.graphs[spec.graph]
            for attr in ("num_layers", "num_heads", "top_k"):
                mine, theirs = getattr(spec, attr), getattr(graph, attr)
                _require(mine is None or theirs is None or mine == theirs,
                         f"drafter '{kind}' says {attr} {mine} but its graph '{spec.graph}' says {theirs}")
    draft = m.graphs.get("draft")
    if draft is not None and draft.num_layers is not None:
        _require(draft.num_layers <= m.dims.num_layers, f"graph 'draft' has {draft.num_layers} layers, more "
                 f"than the target's {m.dims.num_layers}")
    if m.default_drafter not in (None, "none"):
        _require(m.default_drafter in m.drafters, f"'default_drafter' names '{m.default_drafter}', which "
                 f"'drafters' lacks (it has: {', '.join(m.drafters) or 'none'})")


def write_manifest(root: Path, manifest: Manifest | Mapping[str, Any]) -> Path:
    """Write manifest.json atomically; a dict is validated through Manifest.from_dict first."""
    typed = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest, Path(root))
    return write_json(Path(root) / MANIFEST_NAME, typed.to_dict())


def _resolves_inside(path: Path, root: Path) -> bool:
    """True when `path`, links followed, lies inside `root` (a looping link does not)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def load_manifest(root: str | Path) -> Manifest:
    """The manifest of an artifact directory, validated; one ArtifactError line for anything wrong."""
    root = Path(root)
    if not root.exists():
        raise ArtifactError(f"artifact directory {root} does not exist (create it with treespec-export)")
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST_NAME}: not a treespec artifact directory")
    if not _resolves_inside(path, root.resolve()):
        raise ArtifactError(f"{path} is a link that points outside the artifact directory")
    data = read_json_object(path)
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{path} has no schema_version")
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} uses manifest schema {version}, newer than this treespec understands "
            f"({SCHEMA_VERSION}): upgrade treespec or re-export the artifacts with treespec {__version__}")
    if version < SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} uses manifest schema {version}, older than this treespec reads ({SCHEMA_VERSION}): "
            f"re-export the artifacts with treespec-export (treespec {__version__})")
    try:
        return Manifest.from_dict(data, root)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None

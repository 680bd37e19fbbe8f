"""The entries of manifest.json (see treespec.artifacts): one dataclass per section, each with
`to_dict` and a validating `from_dict`.

Every `from_dict` refuses what the runtime would otherwise trip over later (a wrong container
type, a missing key, a bad range, an unknown drafter option) with one ArtifactError line naming the
field. Unknown keys of graph entries and engine records are kept in `extras` and written back, so
an engine build that records something new does not lose it on the next manifest write.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, TypeVar

from treespec.errors import ArtifactError

Range = tuple[int, int, int]
LOOKUP_OPTIONS = ("max_ngram", "min_ngram", "top_k")
T = TypeVar("T")


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ArtifactError(f"manifest {what}")


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ArtifactError(f"manifest {what} must be an object")
    return value


def _int(value: Any, what: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ArtifactError(f"manifest {what} must be an integer >= {minimum}, got {value!r}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ArtifactError(f"manifest {what} must be a non-empty string, got {value!r}")
    return value


def _opt(data: Mapping[str, Any], key: str, check: Callable[[Any, str], T], what: str) -> T | None:
    """data[key] checked by `check`, or None when absent or null."""
    return None if data.get(key) is None else check(data[key], f"{what} '{key}'")


def _get(data: Mapping[str, Any], key: str, default: Any) -> Any:
    """data[key], or `default` when absent or null (a present [] or {} stays, to be type-checked)."""
    value = data.get(key)
    return default if value is None else value


def _range(value: Any, what: str) -> Range:
    ok = (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
          and value[0] <= value[1] <= value[2])
    _require(ok, f"{what} must be [min, opt, max] positive integers with min <= opt <= max, got {value!r}")
    return (value[0], value[1], value[2])


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class Profile:
    """Min/opt/max of the dynamic axes: batch B, tree tokens T and (decoder graphs) cache rows."""

    batch: Range
    tree_tokens: Range
    past: Range | None = None  # None for graphs without a KV cache (Medusa)
    name: str | None = None  # engine profiles are named ("tree", "prefill")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.name is None else {"name": self.name}
        out.update(batch=list(self.batch), tree_tokens=list(self.tree_tokens))
        return out if self.past is None else {**out, "past": list(self.past)}

    @classmethod
    def from_dict(cls, data: Any, what: str) -> "Profile":
        data = _obj(data, what)
        _require("batch" in data and "tree_tokens" in data, f"{what} needs 'batch' and 'tree_tokens' "
                 "as [min, opt, max] positive integers")
        past = _range(data["past"], f"{what} 'past'") if data.get("past") is not None else None
        return cls(_range(data["batch"], f"{what} 'batch'"), _range(data["tree_tokens"], f"{what} 'tree_tokens'"),
                   past, _opt(data, "name", _str, what))


@dataclass
class EngineRecord:
    """One built engine (see treespec.engine_record): which builder and version made which file."""

    file: str
    builder: str
    builder_version: str | None = None
    precision: str | None = None
    profiles: list[Profile] = field(default_factory=list)
    compute_capabilities: list[str] | None = None
    build_seconds: float | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    runtime_cache: str | None = None  # TensorRT-RTX: its JIT cache file
    extras: dict[str, Any] = field(default_factory=dict)  # informational: onnx, precision_source, ...

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("profiles", "extras")}
        return {**_drop_none(out), "profiles": [p.to_dict() for p in self.profiles], **self.extras}

    @classmethod
    def from_dict(cls, data: Any, what: str) -> "EngineRecord":
        data = _obj(data, what)
        known = {f.name for f in fields(cls)} - {"extras"}
        profiles = _get(data, "profiles", [])
        _require(isinstance(profiles, list), f"{what} 'profiles' must be a list")
        return cls(file=_str(data.get("file"), f"{what} 'file'"), builder=_str(data.get("builder"), f"{what} 'builder'"),
                   profiles=[Profile.from_dict(p, f"{what} profile") for p in profiles],
                   extras={k: v for k, v in data.items() if k not in known},
                   **{k: data.get(k) for k in known - {"file", "builder", "profiles"}})


@dataclass
class GraphEntry:
    """One exported ONNX graph: `target`, `draft` or `medusa`."""

    onnx: str
    profile: Profile | None = None
    precision: str = "fp32"
    attention: str | None = None  # decoder graphs: how tree attention was exported
    external_data: bool = False  # weights in `<onnx>.data` beside the graph
    engines: list[EngineRecord] = field(default_factory=list)
    num_layers: int | None = None  # draft graph: its own layer count (the target's is in `model`)
    num_heads: int | None = None  # medusa graph: heads
    top_k: int | None = None  # medusa graph: candidates per head
    outputs_logits: bool | None = None  # medusa graph: also returns full logits (sampling)
    prefill_tokens: int | None = None  # engines: a second, long-T profile
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"onnx": self.onnx, "external_data": self.external_data, "precision": self.precision,
                               "attention": self.attention, "num_heads": self.num_heads, "top_k": self.top_k,
                               "outputs_logits": self.outputs_logits, "prefill_tokens": self.prefill_tokens}
        out = _drop_none(out)
        if self.num_layers is not None:
            out["dims"] = {"num_layers": self.num_layers}
        if self.profile is not None:
            out["profile"] = self.profile.to_dict()
        return {**out, "engines": [e.to_dict() for e in self.engines], **self.extras}

    @classmethod
    def from_dict(cls, name: str, data: Any) -> "GraphEntry":
        what = f"graph '{name}'"
        _require(isinstance(data, Mapping) and isinstance(data.get("onnx"), str),
                 f"{what} must be an object with an 'onnx' file name")
        profile = Profile.from_dict(data["profile"], f"{what} 'profile'") if data.get("profile") is not None else None
        _require(profile is not None or name != "target",
                 f"{what} needs a 'profile' with 'batch' and 'tree_tokens' as [min, opt, max] positive integers")
        engines = _get(data, "engines", [])
        _require(isinstance(engines, list), f"{what} 'engines' must be a list")
        dims = _obj(_get(data, "dims", {}), f"{what} 'dims'")
        known = {f.name for f in fields(cls)} | {"dims"}
        return cls(onnx=data["onnx"], profile=profile, precision=str(data.get("precision", "fp32")),
                   attention=data.get("attention"), external_data=bool(data.get("external_data", False)),
                   engines=[EngineRecord.from_dict(e, f"{what} engine record") for e in engines],
                   num_layers=_opt(dims, "num_layers", _int, f"{what} dims"),
                   num_heads=_opt(data, "num_heads", _int, what), top_k=_opt(data, "top_k", _int, what),
                   outputs_logits=data.get("outputs_logits"), prefill_tokens=_opt(data, "prefill_tokens", _int, what),
                   extras={k: v for k, v in data.items() if k not in known})

    def engine(self, builder: str | None) -> EngineRecord | None:
        """The first engine made by `builder` (any TensorRT flavour when None)."""
        return next((r for r in self.engines if builder is None or r.builder == builder), None)


@dataclass
class DrafterEntry:
    """One drafter: lookup (options only), medusa/draft (a graph + its weights for the torch path)."""

    graph: str | None = None  # the graph it runs (medusa, draft)
    top_k: int | None = None
    num_heads: int | None = None  # medusa
    num_layers: int | None = None  # draft
    weights: str | None = None  # drafters/<kind>.safetensors when trained (else built from the target)
    # eagle: K when the head drafts over a draft vocabulary (its graph's logits are [.., K]; the K
    # target ids are the `draft_vocab` tensor of `weights`); None: the full vocabulary
    draft_vocab: int | None = None
    trained: bool = False
    training: dict[str, Any] = field(default_factory=dict)
    options: dict[str, int] = field(default_factory=dict)  # lookup: LookupDrafter's arguments

    def to_dict(self) -> dict[str, Any]:
        out = _drop_none({"graph": self.graph, "num_heads": self.num_heads, "num_layers": self.num_layers,
                          "top_k": self.top_k, "draft_vocab": self.draft_vocab})
        if self.graph is not None:
            out.update(weights=self.weights, trained=self.trained, training=self.training)
        return {**out, "options": self.options} if self.options or self.graph is None else out

    @classmethod
    def from_dict(cls, kind: str, data: Any) -> "DrafterEntry":
        what = f"drafter '{kind}'"
        data = _obj(data, what)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        _require(not unknown, f"{what} has unknown fields {unknown}: re-export the artifacts with treespec-export")
        options = dict(_obj(_get(data, "options", {}), f"{what} 'options'"))
        if kind == "lookup":
            bad = sorted(set(options) - set(LOOKUP_OPTIONS))
            _require(not bad, f"{what} has unknown options {bad} (known: {', '.join(LOOKUP_OPTIONS)})")
            for key, value in options.items():
                _int(value, f"{what} option '{key}'")
        training = _obj(_get(data, "training", {}), f"{what} 'training'")
        return cls(graph=_opt(data, "graph", _str, what), top_k=_opt(data, "top_k", _int, what),
                   num_heads=_opt(data, "num_heads", _int, what), num_layers=_opt(data, "num_layers", _int, what),
                   weights=_opt(data, "weights", _str, what), draft_vocab=_opt(data, "draft_vocab", _int, what),
                   trained=bool(data.get("trained", False)),
                   training=dict(training), options=options)


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
    def from_dict(cls, d: Any) -> "ModelDims":
        try:
            return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest 'model' section is incomplete or invalid: {exc}") from None


@dataclass
class ModelSection:
    """The target model: its dims (what every graph is shaped by) and provenance."""

    dims: ModelDims
    name: str = "?"
    source: str = "?"  # provenance only: the runtime never opens it
    architecture: str | None = None
    tie_word_embeddings: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dims"}
        return {**out, **{f.name: getattr(self.dims, f.name) for f in fields(ModelDims)}}

    @classmethod
    def from_dict(cls, data: Any) -> "ModelSection":
        dims = ModelDims.from_dict(data if isinstance(data, Mapping) else {})
        _require(dims.num_heads % dims.num_kv_heads == 0 if dims.num_kv_heads > 0 else False,
                 f"'model': num_heads {dims.num_heads} is not a multiple of num_kv_heads {dims.num_kv_heads}")
        eos = _get(data, "eos_token_ids", [])
        _require(isinstance(eos, list) and all(isinstance(t, int) for t in eos), "'model' 'eos_token_ids' must be a list of integers")
        return cls(dims, str(data.get("name", "?")), str(data.get("source", "?")), data.get("architecture"),
                   bool(data.get("tie_word_embeddings", False)), list(eos), data.get("bos_token_id"))


@dataclass
class KvCacheContract:
    """How graphs take the cache (see runtime/backends/base.py): the only layout the runtime runs."""

    layout: str = "fixed-capacity"
    shape: list[str] = field(default_factory=lambda: ["batch", "kv_heads", "capacity", "head_dim"])
    length_input: str = "past_lengths"
    new_rows_output: list[str] = field(default_factory=lambda: ["new_key_{i}", "new_value_{i}"])
    note: str = ("Per layer one key and one value buffer; rows [0, past_lengths[b]) are valid. A step reads "
                 "the buffers in place and returns K/V rows for its tree tokens only; the runtime copies "
                 "just the accepted rows into the buffers.")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any) -> "KvCacheContract":
        data = _obj(data, "'kv_cache'")
        _require(data.get("layout", "fixed-capacity") == "fixed-capacity",
                 f"'kv_cache' layout {data.get('layout')!r} is not the fixed-capacity layout this runtime runs")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class TokenizerEntry:
    path: str  # an HF tokenizer folder inside the artifacts
    chat_template: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "chat_template": self.chat_template}

    @classmethod
    def from_dict(cls, data: Any) -> "TokenizerEntry":
        _require(isinstance(data, Mapping) and isinstance(data.get("path"), str),
                 "'tokenizer' must be an object with a 'path' string")
        return cls(data["path"], bool(data.get("chat_template", False)))


@dataclass
class TorchWeights:
    """The torch backend's copy of the target: an HF folder (config.json + model.safetensors)."""

    path: str
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": "hf-safetensors", "precision": self.precision}

    @classmethod
    def from_dict(cls, data: Any) -> "TorchWeights":
        data = _obj(data, "'torch_weights'")
        return cls(_str(data.get("path"), "'torch_weights' 'path'"), str(data.get("precision", "fp32")))

"""The Python API: SpeculativeGenerator.from_artifacts(dir).generate(...) / .stream(...).

One generator runs one request at a time (it owns one KV cache): a second concurrent or
interleaved request is refused at once with "this generator is busy" instead of corrupting the
cache. check_request validates a request's numbers without a model, so the CLI can refuse bad
arguments before the 5-20 s model load.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from treespec.runtime.trees.auto import LatencyCache, machine_default_tree
from treespec.errors import InputError, TreespecError
from treespec.runtime.detokenize import IncrementalText
from treespec.runtime.generator import TreeGenerator
from treespec.runtime.loader import load_drafter, load_target, load_tokenizer
from treespec.artifacts import Manifest, load_manifest
from treespec.runtime.trees.config import TreeConfig, show_value
from treespec.runtime.prompts import PromptEncoder
from treespec.runtime.trees.presets import read_tree_config
from treespec.runtime.verify import SamplingParams

MAX_NEW_TOKENS_LIMIT = 1 << 20
MAX_SEED = (1 << 63) - 1


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: dict[str, Any]


@dataclass
class StreamChunk:
    text: str  # new text since the previous chunk
    token_ids: list[int]  # new token ids since the previous chunk
    accepted: int  # tokens this step produced (accepted drafts + the bonus token)
    finished: bool


def _validate_sampling(temperature: float, top_p: float, top_k: int) -> SamplingParams:
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature < 0):
        raise InputError(f"temperature must be >= 0 and finite, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise InputError(f"top_k must be an integer >= 0, got {top_k!r}")
    return SamplingParams(float(temperature), float(top_p), int(top_k))


def check_request(max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                  seed: int | None = None, acceptance: str = "exact", posterior_threshold: float = 0.09,
                  posterior_alpha: float = 0.3) -> SamplingParams:
    """A request's numbers, validated without any model; problems are InputErrors."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise InputError(f"max_new_tokens {max_new_tokens} is over the limit {MAX_NEW_TOKENS_LIMIT}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise InputError(f"seed must be an integer in [0, 2^63), got {show_value(seed)}")
    return _validate_sampling(temperature, top_p, top_k).with_acceptance(
        acceptance, posterior_threshold, posterior_alpha)


def check_tree_fits(manifest: Manifest, cfg: TreeConfig) -> None:
    """The tree fits the target graph's profile (a manifest check: no model needed)."""
    profile_max = manifest.profile("target").tree_tokens[2]
    if cfg.max_nodes > profile_max:
        raise InputError(
            f"tree has up to {cfg.max_nodes} nodes but the target graph's profile allows "
            f"{profile_max} tree tokens: re-export with a larger --max-tree-tokens or shrink the tree"
        )


def encode_prompt(encoder: PromptEncoder, manifest: Manifest, prompt: str | Sequence[int] | Sequence[dict],
                  raw: bool = False) -> list[int]:
    """Token ids for a prompt, refused if empty, outside the vocabulary or over the context."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        if not any(str(m.get("content", "")).strip() for m in prompt):
            raise InputError("the prompt is empty")
        prompt = encoder.encode_messages(list(prompt))
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt is empty")
        ids = encoder.encode_text(prompt, raw)
    else:
        ids = list(prompt)
        vocab = manifest.dims.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InputError(f"token ids must be integers in [0, {vocab})")
    ids = [int(t) for t in ids]
    if not ids:
        raise InputError("the prompt is empty")
    if len(ids) >= manifest.dims.max_context:
        raise InputError(
            f"the prompt has {len(ids)} tokens; the context limit is {manifest.dims.max_context} "
            "(at least one token must be left to generate)")
    return ids


class SpeculativeGenerator:
    def __init__(self, manifest: Manifest, backend: str = "onnxruntime", device: str = "cpu",
                 tree: Any = None, threads: int | None = None, drafter: str | None = None):
        self.manifest = manifest
        self.tokenizer = load_tokenizer(manifest)
        self.prompts = PromptEncoder(self.tokenizer)
        self._busy = threading.Lock()
        self.target = load_target(manifest, backend, device, threads)
        self.drafter = load_drafter(manifest, backend, device, threads, drafter)
        if tree is None:
            kind = self.drafter.kind if self.drafter else None
            tree = machine_default_tree(manifest.default_tree(kind), kind, device)
        self.default_tree = self.resolve_tree(tree)
        self.engine = TreeGenerator(self.target, self.drafter, manifest.eos_token_ids,
                                    manifest.dims.max_context,
                                    latency_cache=LatencyCache(manifest.root, backend, device, threads))

    @classmethod
    def from_artifacts(cls, path: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                       tree: Any = None, threads: int | None = None,
                       drafter: str | None = None) -> "SpeculativeGenerator":
        return cls(load_manifest(path), backend, device, tree, threads, drafter)

    @property
    def max_context(self) -> int:
        return self.manifest.dims.max_context

    def resolve_tree(self, tree: Any) -> TreeConfig:
        """A TreeConfig from: None/'none', a preset name, a YAML/JSON file path, JSON text or a dict."""
        cfg = read_tree_config(tree)
        check_tree_fits(self.manifest, cfg)
        if self.drafter is None and cfg.policy != "none":
            raise InputError("these artifacts have no drafter: only --tree none is possible")
        max_depth = self.drafter.max_depth if self.drafter is not None else None
        if cfg.policy == "choices" and max_depth is not None and cfg.levels > max_depth:
            raise InputError(f"tree needs {cfg.levels} Medusa heads but the graph has {max_depth}")
        return cfg

    def encode(self, prompt: str | Sequence[int] | Sequence[dict], raw: bool = False) -> list[int]:
        """Token ids for a prompt: text (chat template applied unless raw), chat messages
        ([{"role": ..., "content": ...}]) or token ids. Control tokens typed in text or message
        contents stay plain text unless raw (runtime/prompts.py PromptEncoder)."""
        return encode_prompt(self.prompts, self.manifest, prompt, raw)

    def stream_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 128,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int | None = None, tree: Any = None, raw: bool = False,
                     acceptance: str = "exact", posterior_threshold: float = 0.09,
                     posterior_alpha: float = 0.3):
        """Yield, per step, a list of per-sequence (new token ids, tokens this step, finished).
        acceptance="typical" is Medusa's typical acceptance: LOSSY (see runtime/verify.py)."""
        sampling = check_request(max_new_tokens, temperature, top_p, top_k, seed, acceptance,
                                 posterior_threshold, posterior_alpha)
        if not prompts:
            raise InputError("no prompts given")
        cfg = self.default_tree if tree is None else self.resolve_tree(tree)
        ids = [self.encode(p, raw) for p in prompts]
        profile = self.manifest.profile("target").batch
        if len(ids) > profile[2]:
            raise InputError(f"batch of {len(ids)} is over the graph profile's maximum {profile[2]}")
        if not self._busy.acquire(blocking=False):
            raise TreespecError("this generator is busy: it runs one request at a time (another thread or an "
                                "unfinished stream is using it); finish or close that one, or use one generator "
                                "per thread")
        try:
            yield from self.engine.run(ids, max_new_tokens, cfg, sampling, seed)
        finally:
            self._busy.release()

    def stream(self, prompt: str | Sequence[int], **kwargs) -> Iterator[StreamChunk]:
        text = IncrementalText(self.tokenizer)
        for event in self.stream_batch([prompt], **kwargs):
            new = event.new_tokens[0]
            yield StreamChunk(text=text.add(new, event.finished[0]), token_ids=new, accepted=len(new),
                              finished=event.finished[0])

    def generate(self, prompt: str | Sequence[int], **kwargs) -> GenerationResult:
        return self.generate_batch([prompt], **kwargs)[0]

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], **kwargs) -> list[GenerationResult]:
        outputs: list[list[int]] = [[] for _ in prompts]
        for event in self.stream_batch(prompts, **kwargs):
            for b, new in enumerate(event.new_tokens):
                outputs[b] += new
        stats = self.engine.stats.as_dict()
        return [GenerationResult(self.tokenizer.decode(o, skip_special_tokens=True), o, stats)
                for o in outputs]

    def close(self) -> None:
        self.target.close()

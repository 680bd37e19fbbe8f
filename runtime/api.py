"""The Python API: SpeculativeGenerator.from_artifacts(dir).generate(...) / .stream(...)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from treespec.runtime.trees.auto import LatencyCache
from treespec.errors import InputError
from treespec.runtime.generator import TreeGenerator
from treespec.runtime.loader import load_drafter, load_target, load_tokenizer
from treespec.artifacts import Manifest, load_manifest
from treespec.runtime.trees.policies import TreeConfig, parse_tree_config
from treespec.runtime.trees.presets import load_tree_preset
from treespec.runtime.verify import SamplingParams

MAX_NEW_TOKENS_LIMIT = 1 << 20


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


class SpeculativeGenerator:
    def __init__(self, manifest: Manifest, backend: str = "onnxruntime", device: str = "cpu",
                 tree: Any = None, threads: int | None = None, drafter: str | None = None):
        self.manifest = manifest
        self.tokenizer = load_tokenizer(manifest)
        self.target = load_target(manifest, backend, device, threads)
        self.drafter = load_drafter(manifest, backend, device, threads, drafter)
        if tree is None:
            tree = manifest.data.get("default_trees", {}).get(self.drafter.kind if self.drafter else "none")
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
        if isinstance(tree, TreeConfig):
            return tree
        if isinstance(tree, str) and tree != "none":
            text = tree.strip()
            if text.startswith("{"):
                try:
                    tree = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise InputError(f"tree: invalid JSON: {exc}") from None
            else:
                tree = load_tree_preset(text)
        cfg = parse_tree_config(tree)
        profile_max = self.manifest.graph("target")["profile"]["tree_tokens"][2]
        if cfg.max_nodes > profile_max:
            raise InputError(
                f"tree has up to {cfg.max_nodes} nodes but the target graph's profile allows "
                f"{profile_max} tree tokens: re-export with a larger --max-tree-tokens or shrink the tree"
            )
        if self.drafter is None and cfg.policy != "none":
            raise InputError("these artifacts have no drafter: only --tree none is possible")
        max_depth = getattr(self.drafter, "max_depth", None)
        if cfg.policy == "choices" and max_depth is not None and cfg.levels > max_depth:
            raise InputError(f"tree needs {cfg.levels} Medusa heads but the graph has {max_depth}")
        return cfg

    def encode(self, prompt: str | Sequence[int] | Sequence[dict], raw: bool = False) -> list[int]:
        """Token ids for a prompt: text (chat template applied unless raw), chat messages
        ([{"role": ..., "content": ...}]) or token ids."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            if not any(str(m.get("content", "")).strip() for m in prompt):
                raise InputError("the prompt is empty")
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            prompt = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("the prompt is empty")
            if not raw and getattr(self.tokenizer, "chat_template", None):
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
                if hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.manifest.dims.vocab_size
            if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
                raise InputError(f"token ids must be integers in [0, {vocab})")
        ids = [int(t) for t in ids]
        if not ids:
            raise InputError("the prompt is empty")
        if len(ids) >= self.max_context:
            raise InputError(
                f"the prompt has {len(ids)} tokens; the context limit is {self.max_context} "
                "(at least one token must be left to generate)")
        return ids

    def stream_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 128,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int | None = None, tree: Any = None, raw: bool = False,
                     acceptance: str = "exact", posterior_threshold: float = 0.09,
                     posterior_alpha: float = 0.3):
        """Yield, per step, a list of per-sequence (new token ids, tokens this step, finished).
        acceptance="typical" is Medusa's typical acceptance: LOSSY (see runtime/verify.py)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if max_new_tokens > MAX_NEW_TOKENS_LIMIT:
            raise InputError(f"max_new_tokens {max_new_tokens} is over the limit {MAX_NEW_TOKENS_LIMIT}")
        if not prompts:
            raise InputError("no prompts given")
        sampling = _validate_sampling(temperature, top_p, top_k).with_acceptance(
            acceptance, posterior_threshold, posterior_alpha)
        cfg = self.default_tree if tree is None else self.resolve_tree(tree)
        ids = [self.encode(p, raw) for p in prompts]
        profile = self.manifest.graph("target")["profile"]["batch"]
        if len(ids) > profile[2]:
            raise InputError(f"batch of {len(ids)} is over the graph profile's maximum {profile[2]}")
        yield from self.engine.run(ids, max_new_tokens, cfg, sampling, seed)

    def stream(self, prompt: str | Sequence[int], **kwargs) -> Iterator[StreamChunk]:
        tokens: list[int] = []
        text = ""
        for event in self.stream_batch([prompt], **kwargs):
            new = event.new_tokens[0]
            tokens += new
            full = self.tokenizer.decode(tokens, skip_special_tokens=True)
            # Hold back an incomplete multi-byte character until the next step completes it.
            if full.endswith("\ufffd") and not event.finished[0]:
                delta = ""
            else:
                delta, text = full[len(text):], full
            yield StreamChunk(text=delta, token_ids=new, accepted=len(new), finished=event.finished[0])

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

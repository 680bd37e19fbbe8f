"""EAGLE drafting on ONNX Runtime CPU with and without a draft vocabulary: the milliseconds of one
draft level and of whole drafts, tokens per verify step, and whether the outputs are the same.

Give two artifact folders whose EAGLE heads differ only in their draft vocabulary (one exported
with the head as it is, one with the head `train-eagle --vocab-only` wrote). A level is what
runtime/drafters/eagle.py does for each tree level: one eagle.onnx step of T rows against PAST
cached rows, then the top-16 of each row's logits on the host; medians of --runs, the two folders
interleaved. Whole drafts: greedy generation of --prompts bench prompts with --tree, the draft
time per step and the tokens per step that the generator records.

    python tools/cpu_draft_vocab.py FULL_ARTIFACTS VOCAB_ARTIFACTS [--prompts 8] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from treespec.artifacts import load_manifest
from treespec.runtime.api import SpeculativeGenerator
from treespec.runtime.backends.device_tensors import topk_logprobs
from treespec.runtime.drafters.eagle import EagleStepInputs
from treespec.runtime.loader import load_drafter
from treespec.runtime.prompts import BUNDLED_BENCH, read_prompts

PAST = 200
TOP_K = 16


def _inputs(tokens: int, start: int, hidden: int, rng: np.random.Generator, causal: bool) -> EagleStepInputs:
    mask = np.tril(np.ones((tokens, tokens), bool)) if causal else np.eye(tokens, dtype=bool)
    mask[:, 0] = True  # a tree level: every row a child of the first
    return EagleStepInputs(rng.integers(0, 1000, (1, tokens)), (start + np.arange(tokens))[None], mask[None],
                           hidden_states=rng.standard_normal((1, tokens, hidden)).astype(np.float32))


class Level:
    """One folder's EAGLE head with PAST committed rows, timing a level of T rows."""

    def __init__(self, artifacts: Path):
        drafter = load_drafter(load_manifest(artifacts), "onnxruntime", "cpu", kind="eagle")
        self.head, self.hidden, self.vocab = drafter.head, drafter.hidden_size, drafter.vocab
        rng = np.random.default_rng(0)
        self.head.reset(1, PAST + 64)
        out = self.head.step(_inputs(PAST, 0, self.hidden, rng, causal=True))
        self.head.commit(out, [list(range(PAST))])

    def ms(self, tokens: int, rng: np.random.Generator) -> float:
        step = _inputs(tokens, PAST, self.hidden, rng, causal=False)
        start = time.perf_counter()
        out = self.head.step(step)
        ids, _ = topk_logprobs(out.logits, [(0, t) for t in range(tokens)], TOP_K)
        if self.vocab is not None:
            ids = self.vocab.target_ids(ids)
        return (time.perf_counter() - start) * 1e3


def level_table(folders: dict[str, Path], sizes: list[int], runs: int) -> dict:
    levels = {name: Level(path) for name, path in folders.items()}
    rng = np.random.default_rng(1)
    out = {}
    for tokens in sizes:
        samples: dict[str, list[float]] = {name: [] for name in levels}
        for _ in range(runs + 2):  # the first two are warm-up
            for name, level in levels.items():
                samples[name].append(level.ms(tokens, rng))
        out[tokens] = {name: round(statistics.median(s[2:]), 2) for name, s in samples.items()}
        print(f"level T={tokens}: " + ", ".join(f"{n} {v} ms" for n, v in out[tokens].items()), flush=True)
    return out


def generation(folders: dict[str, Path], prompts: list, tree, new_tokens: int) -> dict:
    """Both folders' generators loaded at once and run prompt by prompt, taking turns (the
    machine's drift lands on both alike); per folder: draft ms per step, tokens per step, decode
    tokens/s, and whether every output equals the first folder's."""
    gens = {name: SpeculativeGenerator.from_artifacts(path, "onnxruntime", "cpu", drafter="eagle")
            for name, path in folders.items()}
    totals = {name: {"draft_s": 0.0, "decode_s": 0.0, "steps": 0, "accepted": [], "tokens": 0, "outputs": []}
              for name in gens}
    for i, prompt in enumerate(prompts):
        for name in list(gens)[::1 if i % 2 else -1]:
            gen, t = gens[name], totals[name]
            if i == 0:
                gen.generate(gen.encode(prompt), max_new_tokens=16, tree=tree)  # warm-up: sessions, arenas
            t["outputs"].append(gen.generate(gen.encode(prompt), max_new_tokens=new_tokens, tree=tree).token_ids)
            stats = gen.engine.stats
            t["draft_s"] += stats.draft_s
            t["decode_s"] += stats.decode_s
            t["steps"] += stats.steps
            t["accepted"] += stats.accepted
            t["tokens"] += max(stats.new_tokens - 1, 0)
    for gen in gens.values():
        gen.close()
    first = next(iter(totals.values()))["outputs"]
    return {name: {"draft_ms_per_step": round(t["draft_s"] / max(t["steps"], 1) * 1e3, 2),
                   "tokens_per_step": round(float(np.mean(t["accepted"])), 3),
                   "decode_tokens_per_s": round(t["tokens"] / t["decode_s"], 2), "steps": t["steps"],
                   "same_outputs": t["outputs"] == first} for name, t in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("full", type=Path)
    p.add_argument("vocab", type=Path)
    p.add_argument("--prompts", type=int, default=8, help="bench prompts generated (0: no generation)")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--tree", action="append", help="tree preset or policy (repeatable; default eagle2-d6-k8-n64)")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    folders = {"full": args.full, "vocab": args.vocab}
    result = {"levels_ms": level_table(folders, [1, 8, 24], args.runs), "generation": {}}
    prompts = read_prompts(BUNDLED_BENCH)[:args.prompts]
    for tree in (args.tree or ["eagle2-d6-k8-n64"]) if prompts else []:
        result["generation"][tree] = generation(folders, prompts, tree, args.new_tokens)
        print(f"{tree}: {json.dumps(result['generation'][tree])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

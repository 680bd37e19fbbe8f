"""`treespec bench`: backends x drafters x trees against plain decoding and HF transformers.

Every configuration decodes the same prompts (greedy, batch 1) after an untimed warm-up of at least
WARM_S seconds; per prompt it records tokens/s (new tokens over the wall time of the whole generation,
prefill included), mean accepted tokens per verify step and the draft / verify / host time split,
then reports medians over prompts. Each speculative output is compared with the same backend's
`--tree none` output (lossless check). Baselines run in the same process on the same device:
treespec `--tree none` (`ar`), HF `generate` greedy (`hf`), HF assisted generation with
`prompt_lookup_num_tokens` and with the draft LM as `assistant_model` (`hf-assisted`).
The verify step's latency vs tree size (one target pass at T tokens) is saved for `--tree auto`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from treespec.errors import InputError
from treespec.runtime.api import SpeculativeGenerator
from treespec.runtime.commands.bench_kernels import curves, sync
from treespec.runtime.commands.bench_report import plot, print_table, summary
from treespec.runtime.generator import TreeGenerator
from treespec.runtime.loader import load_drafter, load_hf_draft, load_hf_model
from treespec.runtime.prompts import BUNDLED_BENCH, read_categories, read_prompts
from treespec.runtime.verify import SamplingParams

WARM_S = 1.0  # seconds of warm-up before each configuration (BenchRun.timed)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", required=True, type=Path, help="artifact directory from treespec-export")
    p.add_argument("--prompts", type=Path, default=BUNDLED_BENCH, help="JSONL prompts")
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--backends", default=None,
                   help="comma list: torch, onnxruntime, ... (default: torch on CUDA, onnxruntime on the CPU)")
    p.add_argument("--drafters", default=None, help="comma list (default: every drafter in the artifacts)")
    p.add_argument("--trees", action="append", default=None,
                   help="'default' (the drafter's tree), preset names or inline JSON; comma list or repeated")
    p.add_argument("--baselines", default="ar,hf,hf-assisted", help="comma list of ar, hf, hf-assisted ('' for none)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--hf-prompts", type=int, default=0,
                   help="run the HF baselines on only the first N prompts (0: all; HF is slow)")
    p.add_argument("--prompt-lookup-tokens", type=int, default=10, help="HF prompt_lookup_num_tokens")
    p.add_argument("--curve-reps", type=int, default=20, help="timed repetitions per tree size")
    p.add_argument("--curves", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the verify-latency curves and the step profile (--no-curves: skip)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; configurations still to run after this are skipped (0: no limit)")
    p.add_argument("--json", type=Path, required=True, help="write results here")
    p.add_argument("--plot", type=Path, help="write a PNG here")
    p.add_argument("--threads", type=int)
    p.add_argument("--host-trees", action="store_true",
                   help="also run each speculative row with trees the host builds and uploads, where the target "
                        "would verify a drafter's trees on the device (torch: TreeBackend.device_trees)")


def _split(values) -> list[str]:
    out = []
    for value in values or []:
        value = value.strip()
        out += [value] if value.startswith("{") else [v.strip() for v in value.split(",") if v.strip()]
    return out


def _median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 4) if xs else None


class _Progress:
    """One tick per configuration (rows, skips and failures alike), so the bar reaches its total."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)

    def set_total(self, total: int) -> None:
        self.bar.total = total
        self.bar.refresh()

    def update(self, label: str) -> None:
        self.bar.set_description(label[:48])
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _summarise(name: str, runs: list[dict], reference: list[list[int]] | None) -> dict:
    outputs = [r["tokens"] for r in runs]
    row = {
        "name": name,
        "prompts": len(runs),
        "tokens_per_s": _median([r["tokens_per_s"] for r in runs]),
        "tokens_per_s_all": [r["tokens_per_s"] for r in runs],
        "new_tokens": sum(len(o) for o in outputs),
    }
    stats = [r.get("stats") for r in runs if r.get("stats")]
    if stats:
        steps = [s["steps"] for s in stats]
        row["mean_accepted"] = _median([s["mean_accepted"] for s in stats])
        row["mean_accepted_all"] = [round(s["mean_accepted"], 4) for s in stats]
        row["mean_tree_size"] = _median([s["mean_tree_size"] for s in stats])
        hist: list[int] = []
        for s in stats:
            for i, c in enumerate(s["accepted_histogram"]):
                hist += [0] * (i + 1 - len(hist))
                hist[i] += c
        row["accepted_histogram"] = hist
        per_step = {}
        for part in ("draft", "verify", "host"):
            per_step[part] = _median([s["time_s"][part] / n * 1e3 for s, n in zip(stats, steps) if n])
        row["per_step_ms"] = per_step
        row["time_split_s"] = {part: _median([s["time_s"][part] for s in stats])
                               for part in ("prefill", "draft", "verify", "host")}
        row["steps"] = _median(steps)
    if reference is not None:
        same = [o == ref for o, ref in zip(outputs, reference)]
        row["lossless"] = all(same)
        row["identical_prompts"] = f"{sum(same)}/{len(same)}"
        if not all(same):
            first = next(i for i, s in enumerate(same) if not s)
            a, b = outputs[first], reference[first]
            pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            row["first_difference"] = {"prompt": first, "token": pos}
    return row


def _run_treespec(engine, prompts, max_new_tokens, tree, device):
    runs = []
    for ids in prompts:
        sync(device)
        start = time.perf_counter()
        tokens: list[int] = []
        for event in engine.run([ids], max_new_tokens, tree, SamplingParams()):
            tokens += event.new_tokens[0]
        sync(device)
        seconds = time.perf_counter() - start
        runs.append({"tokens": tokens, "seconds": seconds, "tokens_per_s": len(tokens) / seconds,
                     "stats": engine.stats.as_dict()})
    return runs


def _run_hf(model, prompts, max_new_tokens, device, eos, **kwargs):
    runs = []
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos[0], **kwargs)
        sync(device)
        seconds = time.perf_counter() - start
        tokens = out[0, len(ids):].tolist()
        runs.append({"tokens": tokens, "seconds": seconds, "tokens_per_s": len(tokens) / seconds})
    return runs


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


@dataclass
class BenchRun:
    """What every part of one bench run shares: its arguments, prompts, results and progress."""

    args: argparse.Namespace
    device: str
    result: dict
    prompts: list[list[int]]
    warm: list[list[int]]  # the longest prompt, decoded untimed before each configuration
    bar: _Progress
    started: float = field(default_factory=time.perf_counter)

    def over_budget(self) -> bool:
        return bool(self.args.time_budget) and time.perf_counter() - self.started > self.args.time_budget

    def skip(self, config: str, why: str) -> None:
        self.result["skipped"].append({"config": config, "why": why[:300]})
        self.bar.update(config)

    def add(self, key: str, row: dict) -> None:
        self.result[key].append(row)
        self.bar.update(row["name"])
        _write(self.args.json, self.result)

    def timed(self, engine, tree) -> list[dict]:
        # Warm-up for at least WARM_S: a row's first run captures its graphs, and on the H100 the first
        # EAGLE row after the drafter's load (seconds of an idle GPU) ran 10-25% slower than the same
        # configuration later in the run when warmed by one prompt (~0.2 s).
        start = time.perf_counter()
        while True:
            _run_treespec(engine, self.warm, self.args.max_new_tokens, tree, self.device)
            if time.perf_counter() - start >= WARM_S:
                break
        return _run_treespec(engine, self.prompts, self.args.max_new_tokens, tree, self.device)


def _bench_plain(bench: BenchRun, backend_name: str, gen) -> tuple[dict, dict[str, list[list[int]]]]:
    """`--tree none` on this backend: the reference tokens and tok/s every other row is held to,
    then (CUDA) plain decoding as fast as it goes, in 1-token steps not padded to the tree steps'
    bucket (the padding is what makes plain and cuBLAS tree steps bit-identical, and it has a cost).
    With the torch backend's per-generation GEMM kind (TorchBackend.plan) the two are the references
    of the two kinds, cuBLAS padded and Triton unpadded: a row is held to the one of the kind it ran
    with. Returns the first row and the references by GEMM kind."""
    target, manifest = gen.target, gen.manifest
    none_tree = gen.resolve_tree("none")
    engine = TreeGenerator(target, None, manifest.eos_token_ids, manifest.dims.max_context)
    per_kind = bench.device == "cuda" and getattr(target, "gemm_choice", None) == "auto"
    if per_kind:
        target.pinned_kind = "auto"  # cuBLAS, padded to 64 rows
    runs = bench.timed(engine, none_tree)
    references = {_gemm_kind(target): [r["tokens"] for r in runs]}
    base = _summarise(f"{backend_name} --tree none", runs, references[_gemm_kind(target)])
    base.update(backend=backend_name, drafter="none", tree="none", gemm=_gemm_kind(target))
    bench.add("configs", base)
    if bench.device == "cuda" and (per_kind or target.min_bucket > 1) and not bench.over_budget():
        padded = target.min_bucket
        if per_kind:
            target.pinned_kind = "triton"
        else:
            target.min_bucket = 1
        runs = bench.timed(engine, none_tree)
        # per kind this row is the Triton kind's reference, not held to cuBLAS's: only counted (the
        # two kinds round differently, so a near-tie argmax may flip)
        row = _summarise(f"{backend_name} --tree none, 1-token steps", runs,
                         None if per_kind else references[base["gemm"]])
        if per_kind:
            same = sum(r["tokens"] == ref for r, ref in zip(runs, references[base["gemm"]]))
            row["same_as_padded"] = f"{same}/{len(runs)}"
        row.update(backend=backend_name, drafter="none", tree="none-1-token-steps", gemm=_gemm_kind(target))
        bench.result["configs"].append(row)
        if per_kind:
            references["triton"] = [r["tokens"] for r in runs]
        else:
            target.min_bucket = padded
    if per_kind:
        target.pinned_kind = None
    return base, references


def _gemm_kind(target) -> str:
    return getattr(target, "gemm_kind", "")


def _bench_drafter(bench: BenchRun, backend_name: str, gen, kind: str, trees: list[str],
                   base: dict, references: dict[str, list[list[int]]]) -> None:
    """One drafter under every requested tree, each row checked token for token against `--tree none`
    with the same GEMM kind."""
    manifest, drafter = gen.manifest, None
    for tree_name in trees:
        label = f"{backend_name} {kind} {tree_name}"
        if bench.over_budget():
            bench.skip(label, "time budget")
            continue
        try:
            if drafter is None:
                drafter = load_drafter(manifest, backend_name, bench.device, bench.args.threads, kind)
            gen.drafter = drafter
            spec = manifest.default_tree(kind) if tree_name == "default" else tree_name
            cfg = gen.resolve_tree(spec)
        except InputError as exc:
            bench.skip(label, str(exc))
            continue
        on_device = type(gen.target).device_trees
        for device_trees in [on_device] + ([False] if on_device and bench.args.host_trees else []):
            gen.target.device_trees = device_trees
            row_label = label if device_trees == on_device else f"{label}, host trees"
            engine = TreeGenerator(gen.target, drafter, manifest.eos_token_ids, manifest.dims.max_context)
            try:
                runs = bench.timed(engine, cfg)
            except Exception as exc:  # record and go on with the other configurations
                bench.skip(row_label, f"{type(exc).__name__}: {exc}")
                continue
            finally:
                gen.target.device_trees = on_device
            gemm = _gemm_kind(gen.target)
            row = _summarise(row_label, runs, references.get(gemm, references[base["gemm"]]))
            row.update(backend=backend_name, drafter=kind, tree=tree_name, tree_config=cfg.__dict__, gemm=gemm,
                       device_trees=device_trees,
                       speedup_vs_tree_none=round(row["tokens_per_s"] / base["tokens_per_s"], 3))
            bench.add("configs", row)


def _bench_backend(bench: BenchRun, backend_name: str, gen, drafters: list[str], trees: list[str]) -> None:
    base, references = _bench_plain(bench, backend_name, gen)
    for kind in drafters:
        if kind not in gen.manifest.drafters:
            bench.result["skipped"].append({"drafter": kind, "why": "not in the artifacts"})
            continue
        _bench_drafter(bench, backend_name, gen, kind, trees, base, references)
    # The curves and the step profile last: EAGLE's rows measured after them ran slower on the H100
    # (963 against 1,174 tok/s with the same head in the same lease; draft 1.06 / verify 1.38 / host
    # 0.21 ms against 0.93 / 1.19 / 0.14).
    if bench.args.curves and not bench.over_budget():
        try:
            curves(bench.result, backend_name, gen.target, gen.manifest, bench.device, bench.args)
        except Exception as exc:
            bench.result["skipped"].append({"config": f"{backend_name} verify curve",
                                            "why": f"{type(exc).__name__}: {exc}"[:300]})
        _write(bench.args.json, bench.result)


def _hf_configs(bench: BenchRun, manifest) -> list[tuple[str, dict]]:
    baselines, todo = _split([bench.args.baselines]), []
    if "hf" in baselines:
        todo.append(("hf greedy", {}))
    if "hf-assisted" in baselines:
        todo.append((f"hf assisted prompt_lookup_num_tokens={bench.args.prompt_lookup_tokens}",
                     {"prompt_lookup_num_tokens": bench.args.prompt_lookup_tokens}))
        if "draft" in manifest.drafters:
            todo.append(("hf assisted assistant_model=draft LM", {"assistant_model": None}))
    return todo


def _bench_hf(bench: BenchRun, manifest) -> None:
    """HF transformers `generate` greedy and assisted, on the same prompts and device."""
    todo = _hf_configs(bench, manifest)
    if not todo:
        return
    model, eos, greedy = load_hf_model(manifest, bench.device), list(manifest.eos_token_ids), None
    prompts = bench.prompts[: bench.args.hf_prompts] if bench.args.hf_prompts else bench.prompts
    for name, kwargs in todo:
        if bench.over_budget():
            bench.skip(name, "time budget")
            continue
        if "assistant_model" in kwargs:
            kwargs = {"assistant_model": load_hf_draft(manifest, bench.device)}
        try:
            _run_hf(model, bench.warm, min(bench.args.max_new_tokens, 32), bench.device, eos, **kwargs)
            runs = _run_hf(model, prompts, bench.args.max_new_tokens, bench.device, eos, **kwargs)
        except Exception as exc:  # an HF API change must not lose the other results
            bench.skip(name, f"{type(exc).__name__}: {exc}")
            continue
        row = _summarise(name, runs, None)
        greedy = runs if name == "hf greedy" else greedy
        if greedy is not None:
            same = [r["tokens"] == h["tokens"] for r, h in zip(runs, greedy)]
            row["identical_to_hf_greedy"] = f"{sum(same)}/{len(same)}"
        bench.add("baselines", row)


def _start(args, device: str) -> tuple[BenchRun, SpeculativeGenerator]:
    texts = read_prompts(args.prompts, args.num_prompts)
    result: dict = {
        "artifacts": str(args.artifacts), "prompts_file": str(args.prompts), "num_prompts": len(texts),
        "max_new_tokens": args.max_new_tokens, "device": device, "batch": 1, "sampling": "greedy",
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "torch": torch.__version__,
        "transformers": transformers.__version__, "configs": [], "baselines": [], "verify_curve_ms": {},
        "skipped": [], "prompt_categories": read_categories(args.prompts, args.num_prompts),
    }
    first = SpeculativeGenerator.from_artifacts(args.artifacts, _split([args.backends])[0], device,
                                                threads=args.threads, drafter="none")
    prompts = [first.encode(t) for t in texts]
    result["prompt_tokens"] = [len(p) for p in prompts]
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    return BenchRun(args, device, result, prompts, [prompts[longest]], _Progress(0)), first


def run(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.backends = args.backends or ("torch" if device == "cuda" else "onnxruntime")
    backends = _split([args.backends])
    bench, first = _start(args, device)
    manifest = first.manifest
    drafters = _split([args.drafters]) if args.drafters else list(manifest.drafters)
    trees = _split(args.trees) or ["default"]
    bench.bar.set_total(len(backends) * (1 + len(drafters) * len(trees)) + len(_hf_configs(bench, manifest)))
    for backend_name in backends:
        gen = first if backend_name == backends[0] else SpeculativeGenerator.from_artifacts(
            args.artifacts, backend_name, device, threads=args.threads, drafter="none")
        _bench_backend(bench, backend_name, gen, drafters, trees)
    _bench_hf(bench, manifest)
    bench.bar.close()
    result = bench.result
    result["summary"] = summary(result)
    result["total_s"] = round(time.perf_counter() - bench.started, 1)
    _write(args.json, result)
    if args.plot:
        plot(result, args.plot)
    print_table(result)
    return 0

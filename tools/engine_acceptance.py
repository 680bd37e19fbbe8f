"""Tokens per step of the serving batch engine (runtime/batching.py, no server) against the Python
API on the same prompts, one request at a time: a drafting bug that only the engine has (features
read from a reused output buffer, a catch-up that misses rows) shows as fewer tokens per step with
the same output. Fixed trees (sizing off) compare like with like; sizing on shows what the load
sizer chooses at width 1. Also the milliseconds per step of each phase: the API on the main thread,
the API on a second thread (as the engine runs; also with one torch intra-op thread), and the
engine: on the H100 the server's target step took ~1.4 ms where the API's verify took ~1.1; on this
CPU running the API from a second thread alone cost 10-40% (tiny model, torch backend), and the
engine matched the API-in-a-thread.

    python3 tools/engine_acceptance.py ARTIFACTS [--device cuda] [--prompts 8] [--tokens 128]
"""
from __future__ import annotations

import argparse
import json
import threading

import numpy as np

from treespec.runtime.api import SpeculativeGenerator
from treespec.runtime.batching import BatchEngine, SlotRequest
from treespec.runtime.prompts import BUNDLED_BENCH, read_prompts
from treespec.runtime.verify import SamplingParams


def engine_run(engine: BatchEngine, prompt: list[int], tokens: int, tree) -> tuple[list[int], int]:
    """(tokens, verify steps after the prefill) of one request alone in the engine."""
    done, out = threading.Event(), []

    def emit(new: list[int], finished: bool) -> bool:
        out.extend(new)
        if finished:
            done.set()
        return True

    steps = engine.stats.steps
    engine.submit(SlotRequest(prompt=prompt, max_new_tokens=tokens, tree=tree, sampling=SamplingParams(),
                              seed=None, emit=emit))
    if not done.wait(600):
        raise TimeoutError("the engine did not finish the request in 600 s")
    return out, engine.stats.steps - steps


def api_phases(gen: SpeculativeGenerator, prompts: list, tokens: int) -> dict[str, float]:
    """The generator's draft / verify / host milliseconds per step over the prompts."""
    steps, split = 0, {"draft": 0.0, "verify": 0.0, "host": 0.0}
    for prompt in prompts:
        stats = gen.generate(prompt, max_new_tokens=tokens).stats
        steps += stats["steps"]
        for key in split:
            split[key] += stats["time_s"][key]
    return {k: round(v / max(1, steps) * 1e3, 3) for k, v in split.items()}


def on_a_thread(work, torch_threads: int | None = None):
    """work() run on a second thread, as the batch engine runs its steps (with torch limited to
    `torch_threads` intra-op threads meanwhile)."""
    import torch

    before = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    out: list = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    thread.join()
    torch.set_num_threads(before)
    return out[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--drafter", default="eagle")
    p.add_argument("--tree", help="default: the drafter's")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    gen = SpeculativeGenerator.from_artifacts(args.artifacts, backend=args.backend, device=args.device,
                                              drafter=args.drafter, tree=args.tree)
    prompts = read_prompts(BUNDLED_BENCH, args.prompts)
    api = [gen.generate(p, max_new_tokens=args.tokens) for p in prompts]  # also the warm-up
    result = {"tree": str(gen.default_tree), "api_tokens_per_step": float(np.mean(
        [r.stats["mean_accepted"] for r in api])),
        "api_tokens_per_step_over_all_steps": round(sum(len(r.token_ids) - 1 for r in api)
                                                    / max(1, sum(r.stats["steps"] for r in api)), 3),
        "api_ms_per_step": api_phases(gen, prompts, args.tokens),
        "api_on_a_thread_ms_per_step": on_a_thread(lambda: api_phases(gen, prompts, args.tokens)),
        # the candidate fix if a thread is the cause: one intra-op thread for torch (process-wide)
        "api_on_a_thread_one_torch_thread_ms_per_step": on_a_thread(
            lambda: api_phases(gen, prompts, args.tokens), torch_threads=1)}
    for sizing in (False, True):
        engine = BatchEngine(gen.engine, 1, gen.manifest.profile("target").tree_tokens[2], sizing=sizing)
        made = same = steps = 0
        for prompt, want in zip(prompts, api):
            out, n = engine_run(engine, gen.encode(prompt), args.tokens, gen.default_tree)
            made, steps, same = made + len(out) - 1, steps + n, same + (out == list(want.token_ids))
        engine.close()
        key = "engine_sized" if sizing else "engine_fixed"
        result[key] = {"tokens_per_step": round(made / max(1, steps), 3), "same_output": same,
                       "prompts": len(prompts),
                       "ms_per_step": {k: round(v / max(1, engine.stats.steps) * 1e3, 3)
                                       for k, v in engine.stats.seconds.items()}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

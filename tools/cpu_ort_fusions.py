"""Milliseconds per target step of two artifact folders' target.onnx on ONNX Runtime CPU (e.g. one
exported with --ort-fusions and one without), at T = 1, 16, 64 tree tokens against 200 cached
tokens, batch 1; max |logits difference| and argmax agreement on the same random feeds.

    python tools/cpu_ort_fusions.py BASE_ARTIFACTS FUSED_ARTIFACTS [--json OUT] [--runs 10]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

PAST = 200


def feeds(session: ort.InferenceSession, tokens: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            out[i.name] = rng.integers(0, 1000, (1, tokens))
        elif i.name == "position_ids":
            out[i.name] = (PAST + np.arange(tokens))[None]
        elif i.name == "tree_mask":
            out[i.name] = np.tril(np.ones((tokens, tokens), bool))[None]
        elif i.name == "past_lengths":
            out[i.name] = np.array([PAST])
        else:  # past keys / values [batch, kv heads, past, head dim]
            out[i.name] = rng.standard_normal((1, i.shape[1], PAST + 64, i.shape[3])).astype(np.float32)
    return out


def ms_per_step(session: ort.InferenceSession, feed: dict, runs: int) -> float:
    session.run(["logits"], feed)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(["logits"], feed)
    return (time.perf_counter() - start) / runs * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("fused", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    base, fused = (ort.InferenceSession(str(d / "target.onnx"), providers=["CPUExecutionProvider"])
                   for d in (args.base, args.fused))
    rows = []
    for tokens in (1, 16, 64):
        feed = feeds(base, tokens, np.random.default_rng(tokens))
        want, got = base.run(["logits"], feed)[0], fused.run(["logits"], feed)[0]
        rows.append({"tree_tokens": tokens, "base_ms": round(ms_per_step(base, feed, args.runs), 2),
                     "fused_ms": round(ms_per_step(fused, feed, args.runs), 2),
                     "max_abs_logits_diff": float(np.abs(want - got).max()),
                     "same_argmax": bool((want.argmax(-1) == got.argmax(-1)).all())})
        print(rows[-1])
    if args.json:
        args.json.write_text(json.dumps({"past": PAST, "runs": args.runs, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

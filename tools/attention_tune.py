"""Time the ordered tree-attention kernel's launch candidates on a GPU (issue 16: it was the step's
largest kernel, 8.5 us a layer at T = 1 and 64 on an H100 with 64-key blocks and no pipelining; the
default became this tool's pick, see treespec.plugins.tree_attention.ordered.OrderedLaunch).

    python3 tools/attention_tune.py [--json OUT] [--layers 30]

SmolLM2-135M's shapes (9 query heads, 3 KV heads, head dim 64, fp16): per candidate, a CUDA graph of
`--layers` launches (one per layer, as in a step) is replayed and timed, for T = 1 and 64 tree tokens
at batch 1 and T = 8 at batch 8, after 320 cached tokens. Prints a table and the best candidate
(least summed time), the value for TREESPEC_ORDERED_ATTENTION; every candidate's output is checked
against the default launch's (close, not bitwise: the key blocks differ).
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
from graph_timing import replay_us

from treespec.plugins.tree_attention.ordered import OrderedLaunch, ordered_tree_attention, tree_ancestors
from treespec.plugins.tree_attention.ordered_check import random_tree

HEADS, KV_HEADS, DIM, PAST = 9, 3, 64, 320
CASES = ((1, 1), (1, 64), (8, 8))  # (batch, tree tokens)


def _inputs(batch: int, tokens: int, gen: torch.Generator):
    rows = PAST + tokens + 8
    q = torch.randn(batch, HEADS, tokens, DIM, generator=gen).half().cuda()
    k = torch.randn(batch, KV_HEADS, rows, DIM, generator=gen).half().cuda()
    v = torch.randn(batch, KV_HEADS, rows, DIM, generator=gen).half().cuda()
    _, mask = random_tree(tokens, gen)
    anc, depth = tree_ancestors(mask.expand(batch, tokens, tokens).contiguous().cuda())
    lengths = torch.full((batch,), PAST, dtype=torch.int64, device="cuda")
    return q, k, v, lengths, anc, depth


def time_case(launch: OrderedLaunch, args, layers: int, reps: int = 20) -> float:
    """Microseconds per launch, replayed from a CUDA graph of `layers` launches."""
    def step() -> None:
        for _ in range(layers):
            ordered_tree_attention(*args, 0.125, launch=launch)

    return replay_us(step, reps) / layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    cases = {f"B{b} T{t}": _inputs(b, t, gen) for b, t in CASES}
    reference = {name: ordered_tree_attention(*inp, 0.125, launch=OrderedLaunch()) for name, inp in cases.items()}
    rows = []
    for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)):
        launch = OrderedLaunch(block_n, warps, stages)
        try:
            us = {name: round(time_case(launch, inp, args.layers), 2) for name, inp in cases.items()}
            err = max(float((ordered_tree_attention(*inp, 0.125, launch=launch).float()
                             - reference[name].float()).abs().max()) for name, inp in cases.items())
        except Exception as exc:  # a launch the compiler refuses (shared memory): reported, skipped
            print(f"{block_n},{warps},{stages}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        rows.append({"launch": f"{block_n},{warps},{stages}", "us": us, "sum_us": round(sum(us.values()), 2),
                     "max_abs_diff_vs_default": err})
        print(f"{block_n:>4},{warps},{stages}: " + "  ".join(f"{k} {v:6.2f} us" for k, v in us.items())
              + f"  (max |diff| {err:.1e})", flush=True)
    ok = [r for r in rows if r["max_abs_diff_vs_default"] < 1e-2]
    best = min(ok, key=lambda r: r["sum_us"])
    d = OrderedLaunch()
    name = f"{d.block_n},{d.num_warps},{d.num_stages}"
    default = next((r for r in rows if r["launch"] == name), {"sum_us": None})
    print(f"best {best['launch']}: {best['sum_us']} us summed over the cases, default {name}: {default['sum_us']} us")
    if args.json:
        json.dump({"device": torch.cuda.get_device_name(), "past": PAST, "layers": args.layers, "rows": rows,
                   "best": best["launch"], "default": name}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()

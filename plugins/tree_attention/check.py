"""Random tree-attention cases and the kernel-vs-reference comparison used by the tests.

`python -m treespec.plugins.tree_attention.check` reads a JSON list of cases on stdin and
prints one JSON result per case: the CPU test runs it in a subprocess under TRITON_INTERPRET=1
(the interpreter must be switched on before Triton is imported, and must not leak into other
tests); the GPU test calls `run_case` directly.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .reference import tree_attention_reference


@dataclass(frozen=True)
class Case:
    seed: int
    batch: int
    heads: int
    kv_heads: int
    tokens: int
    head_dim: int
    capacity: int
    past_lengths: tuple[int, ...]  # one per batch row, each <= capacity
    dtype: str = "float32"
    splits: int | None = 1  # None: the launcher's choice
    scale: float | None = None
    block_m: int | None = None  # None: the launcher's choice
    extra: dict[str, Any] = field(default_factory=dict)


def random_tree_mask(batch: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Random trees: node i > 0 has a parent among 0..i-1; a node sees itself and its ancestors."""
    mask = torch.zeros(batch, tokens, tokens, dtype=torch.bool)
    for b in range(batch):
        for i in range(tokens):
            mask[b, i, i] = True
            if i:
                parent = int(torch.randint(0, i, (1,), generator=gen))
                mask[b, i] |= mask[b, parent]
    return mask


def level_tree_mask(widths: list[int]) -> torch.Tensor:
    """The tree of a per-level width list ([4,16,16,16,16] -> 69 nodes with the root): each node
    of level l+1 hangs under node (index mod width_l) of level l."""
    parents = [-1]
    level = [0]
    for width in widths:
        nxt = []
        for j in range(width):
            parents.append(level[j % len(level)])
            nxt.append(len(parents) - 1)
        level = nxt
    tokens = len(parents)
    mask = torch.zeros(1, tokens, tokens, dtype=torch.bool)
    for i, parent in enumerate(parents):
        mask[0, i, i] = True
        if parent >= 0:
            mask[0, i] |= mask[0, parent]
    return mask


def make_inputs(case: Case, device: str = "cpu") -> dict[str, Any]:
    gen = torch.Generator().manual_seed(case.seed)  # tree shapes
    values = torch.Generator(device=device).manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=values, device=device).to(dtype)

    b, h, kvh, t, d, c = case.batch, case.heads, case.kv_heads, case.tokens, case.head_dim, case.capacity
    if case.extra.get("levels"):
        mask = level_tree_mask(case.extra["levels"]).expand(b, t, t).clone()
    else:
        mask = random_tree_mask(b, t, gen)
    for row in case.extra.get("hidden_rows", []):  # rows that see no new key (not even themselves)
        mask[:, row] = False
    return dict(q=randn(b, h, t, d), k_new=randn(b, kvh, t, d), v_new=randn(b, kvh, t, d),
                past_k=randn(b, kvh, c, d), past_v=randn(b, kvh, c, d),
                past_lengths=torch.tensor(case.past_lengths, dtype=torch.int64, device=device),
                tree_mask=mask.to(device), scale=case.scale)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max abs error and the error relative to the reference's largest magnitude."""
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    peak = ref.abs().max().item() if ref.numel() else 0.0
    return {"max_abs_err": err, "rel_err": err / max(peak, 1e-6), "ref_peak": peak,
            "finite": bool(torch.isfinite(out.float()).all().item())}


def run_case(case: Case, device: str = "cpu") -> dict[str, Any]:
    from .config import KernelConfig, pick_config
    from .kernel import tree_attention

    inputs = make_inputs(case, device)
    config = pick_config(case.heads, case.kv_heads, case.tokens, case.head_dim)
    if case.block_m is not None:
        config = KernelConfig(case.block_m, config.block_n, config.num_warps, config.num_stages)
    out = tree_attention(**inputs, config=config, splits=case.splits)
    ref = tree_attention_reference(**inputs)
    return {"case": asdict(case), **compare(out, ref)}


def main() -> int:
    cases = [Case(**{**c, "past_lengths": tuple(c["past_lengths"])}) for c in json.load(sys.stdin)]
    for case in cases:
        print(json.dumps(run_case(case)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

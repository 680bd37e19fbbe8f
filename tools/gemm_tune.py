"""Time the fused step's Triton GEMM launches on a GPU and pick each GEMM's tiles (issue 16).

    python3 tools/gemm_tune.py [--json OUT] [--budget 240]

A random SmolLM2-135M-shaped model (30 layers, hidden 576, 9/3 heads, fp16; the weights' values do
not change the time), FusedDecoder steps captured in CUDA graphs and replayed, for T = 1 and 64 tree
tokens at batch 1 and T = 8 at batch 8 after 320 cached tokens: microseconds per whole step (lm_head
and the argmax included). First the cuBLAS step (gemm="cublas") and the Triton step with the default
launches, then one GEMM at a time (down, gate/up, QKV, o_proj) over its candidates with the others
fixed, keeping the least summed time; then the pick without programmatic dependent launch. Also
checks that a row's final hidden state is bitwise the same alone and in a batch of two (the Triton
step's promise; cuBLAS may pick other kernels per shape). Prints the value for TREESPEC_FUSED_GEMMS;
--json writes every timing. Measured on an H100: bench/h100-2026-12-07-night/gemm_tune.json (this
search) and gemm_tune_wide.json (a loop over K slices with 64-row tiles, since removed: slower).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

from graph_timing import replay_us

from treespec.models.fused_decoder import FusedDecoder
from treespec.models.tree_model import TreeDecoder
from treespec.plugins.fused import gemm
from treespec.plugins.pdl import use_pdl

PAST = 320
CASES = ((1, 1), (1, 64), (8, 8))  # (batch, tree tokens)
CURVE = ((1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (1, 24), (1, 32), (1, 48), (1, 64), (1, 128), (2, 8), (4, 8),
         (8, 8), (2, 16), (4, 16), (8, 16))  # --curve: every width a tree or batch may verify
CANDIDATES = {  # (BLOCK_M, BLOCK_N, SPLIT_K, warps)
    "down": [(m, n, s, w) for m, n, s, w in itertools.product((16, 64), (16, 32), (1, 2, 3, 6), (4, 8))],
    "gate_up": [(m, n, 1, w) for m, n, w in itertools.product((16, 64), (16, 32, 64), (4, 8))],
    "qkv": [(m, n, 1, w) for m, n, w in itertools.product((16, 64), (16, 32, 64), (4, 8))],
    "o": [(m, n, s, w) for m, n, s, w in itertools.product((16, 64), (16, 32), (1, 3, 9), (4, 8))],
}
LOOP_CANDIDATES = [gemm.LoopLaunch(16, n, k, w, s)  # --lm-head: (BLOCK_N, BLOCK_K, warps, stages)
                   for n, k, w, s in itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4))]


def smollm2_shaped():
    """A random-weight LlamaForCausalLM of SmolLM2-135M's shapes, fp16 on CUDA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).half().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() == 2 else p.uniform_(0.8, 1.2)
    return model


def step_inputs(decoder: TreeDecoder, batch: int, tokens: int):
    gen = torch.Generator(device="cuda").manual_seed(batch * 1000 + tokens)
    ids = torch.randint(0, 49152, (batch, tokens), device="cuda", generator=gen)
    pos = (PAST + torch.arange(tokens, device="cuda")).repeat(batch, 1)
    mask = torch.tril(torch.ones(tokens, tokens, dtype=torch.int64, device="cuda")).repeat(batch, 1, 1)
    lengths = torch.full((batch,), PAST, dtype=torch.int64, device="cuda")
    shape = (2 * decoder.num_layers, batch, decoder.num_kv_heads, PAST + tokens + 8, decoder.head_dim)
    cache = torch.randn(shape, device="cuda", generator=gen).half()
    return ids, pos, mask, lengths, cache


def step_us(fused: FusedDecoder, inputs, reps: int = 30) -> float:
    """Microseconds per step replayed from a CUDA graph."""
    with torch.no_grad():
        return replay_us(lambda: fused(*inputs), reps)


def timings(fused: FusedDecoder, cases: dict) -> dict:
    return {name: round(step_us(fused, inp), 1) for name, inp in cases.items()}


def row_is_batch_independent(fused: FusedDecoder, decoder: TreeDecoder) -> bool:
    """A row's final hidden state and logits in a 64-token step alone == beside another sequence (a
    batch of 2), bitwise: what keeps a request's output the same alone and in a batch."""
    ids, pos, mask, lengths, cache = step_inputs(decoder, 2, 64)
    with torch.no_grad():
        alone = fused(ids[:1], pos[:1], mask[:1].contiguous(), lengths[:1], cache[:, :1].clone())
        batched = fused(ids, pos, mask, lengths, cache.clone())
    return bool(torch.equal(alone.hidden[0], batched.hidden[0]) and torch.equal(alone.logits[0], batched.logits[0]))


def spec(launches: dict) -> str:
    return ";".join(f"{k}={l.block_m},{l.block_n},{l.split_k},{l.num_warps}" for k, l in launches.items())


def tune(fused: FusedDecoder, cases: dict, deadline: float, rows: list, names: list[str]) -> dict:
    best = dict(gemm.LAUNCHES)
    best_sum = sum(timings(fused, cases).values())
    for name in names:
        for cand in CANDIDATES[name]:
            if time.time() > deadline:
                print("budget spent: search stopped", flush=True)
                return best
            trial = dict(best, **{name: gemm.GemmLaunch(*cand)})
            gemm.LAUNCHES = trial
            try:
                us = timings(fused, cases)
            except Exception as exc:  # a tile the compiler refuses (registers, shared memory): skipped
                print(f"{spec({name: trial[name]})}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                continue
            rows.append({"launches": spec(trial), "us": us})
            total = sum(us.values())
            print(f"{spec({name: trial[name]}):24s} " + "  ".join(f"{k} {v:7.1f}" for k, v in us.items())
                  + f"  sum {total:7.1f}", flush=True)
            if total < best_sum:
                best, best_sum = trial, total
    return best


def curve(decoder: TreeDecoder, path: str | None) -> None:
    """Microseconds per step of each GEMM kind at every (batch, tokens) of CURVE."""
    cases = {f"B{b} T{t}": step_inputs(decoder, b, t) for b, t in CURVE}
    result: dict = {"device": torch.cuda.get_device_name(), "past": PAST, "pdl": use_pdl(torch.device("cuda"))}
    for kind in ("cublas", "triton"):
        result[f"{kind}_us"] = timings(FusedDecoder(decoder, kind), cases)
        print(f"{kind}: {result[f'{kind}_us']}", flush=True)
    steps = [FusedDecoder(decoder, kind)(*cases["B1 T32"]).logits.float() for kind in ("cublas", "triton")]
    result["triton_vs_cublas_logit_error"] = float((steps[1] - steps[0]).abs().max() / steps[0].abs().max())
    result["triton_row_bitwise_alone_vs_batch"] = row_is_batch_independent(FusedDecoder(decoder, "triton"), decoder)
    print({k: result[k] for k in ("triton_vs_cublas_logit_error", "triton_row_bitwise_alone_vs_batch")}, flush=True)
    if path:
        json.dump(result, open(path, "w"), indent=1)


def lm_head_search(decoder: TreeDecoder, deadline: float, path: str | None) -> None:
    """The Triton step's lm_head (gemm.LM_HEAD, a K loop) with each of LOOP_CANDIDATES, by the summed step
    time at 1 and 32 tokens; also the lm_head alone on the EAGLE head's shape (8 rows of a 16,384-id draft
    vocabulary). bench/h100-2026-12-07-2200/lm_head.json also holds the one-K-tile kernel it replaced."""
    cases = {f"B1 T{t}": step_inputs(decoder, 1, t) for t in (1, 32)}
    step = FusedDecoder(decoder, "triton")
    k = decoder.lm_head.weight.shape[1]
    x = torch.randn(8, k, device="cuda").half()
    w = torch.randn(16384, k, device="cuda").half()
    rows: list = []
    for launch in LOOP_CANDIDATES:
        if time.time() > deadline:
            print("budget spent: search stopped", flush=True)
            break
        gemm.LM_HEAD = launch
        try:
            us = dict(timings(step, cases), eagle_lm_head=round(replay_us(lambda: gemm.lm_head(x, w, None), 50), 1))
        except Exception as exc:  # a tile the compiler refuses (registers, shared memory): skipped
            print(f"{launch}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
            continue
        rows.append({"loop": vars(launch), "us": us})
        print(f"{launch}: {us}", flush=True)
    best = min(rows, key=lambda r: r["us"]["B1 T1"] + r["us"]["B1 T32"])
    gemm.LM_HEAD = gemm.LoopLaunch(**best["loop"])
    result = {"device": torch.cuda.get_device_name(), "rows": rows, "best": best,
              "best_row_bitwise_alone_vs_batch": row_is_batch_independent(step, decoder)}
    print(f"best {best}; row bitwise alone vs in a batch: {result['best_row_bitwise_alone_vs_batch']}", flush=True)
    if path:
        json.dump(result, open(path, "w"), indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the search")
    ap.add_argument("--gemms", default=",".join(CANDIDATES), help="the GEMMs searched, comma-separated")
    ap.add_argument("--curve", action="store_true",
                    help="no search: the cuBLAS and Triton steps with the current launches at every width of CURVE")
    ap.add_argument("--lm-head", action="store_true", help="no search of the layers' GEMMs: the lm_head's kernel")
    args = ap.parse_args()
    start = time.time()
    decoder = TreeDecoder(smollm2_shaped())
    if args.curve:
        curve(decoder, args.json)
        return
    if args.lm_head:
        lm_head_search(decoder, start + args.budget, args.json)
        return
    cases = {f"B{b} T{t}": step_inputs(decoder, b, t) for b, t in CASES}
    cublas, triton_step = FusedDecoder(decoder, "cublas"), FusedDecoder(decoder, "triton")
    result: dict = {"device": torch.cuda.get_device_name(), "past": PAST, "pdl": use_pdl(torch.device("cuda"))}
    result["cublas_us"] = timings(cublas, cases)
    print(f"cuBLAS step: {result['cublas_us']}", flush=True)
    gemm.LAUNCHES = gemm.parse_launches(os.environ.get("TREESPEC_FUSED_GEMMS", ""))
    result["triton_default_us"] = timings(triton_step, cases)
    print(f"Triton step, default launches: {result['triton_default_us']}", flush=True)
    rows: list = []
    best = tune(triton_step, cases, start + args.budget, rows, args.gemms.split(","))
    gemm.LAUNCHES = best
    result.update(rows=rows, best=spec(best), best_us=timings(triton_step, cases),
                  row_bitwise_alone_vs_batch=row_is_batch_independent(triton_step, decoder))
    result["auto_us"] = timings(FusedDecoder(decoder, "auto"), cases)
    os.environ["TREESPEC_FUSED_PDL"] = "0"
    result["best_without_pdl_us"] = timings(triton_step, cases)
    print(f"best {result['best']}: {result['best_us']}; without PDL {result['best_without_pdl_us']}; "
          f"cuBLAS {result['cublas_us']}; auto {result['auto_us']}; "
          f"row bitwise alone vs in a batch: {result['row_bitwise_alone_vs_batch']}")
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()

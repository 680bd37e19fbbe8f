"""The EAGLE head's fused forward (treespec.models.fused_eagle) and the tree-KV EAGLE-2 draft, on
the CPU in fp32 under Triton's interpreter, against the unfused head (the reference): the forward
(logits, predicted features, the cache rows it writes) within 1e-4; the whole draft over three
rounds of a ragged batch (feed, levels, rerank; accepted rows fed back) growing the same trees;
and the kernels one draft launches, counted (aten ops that are not views + Triton launches). A head
over a draft vocabulary (EAGLE-3's): its fused subset logits equal the unfused head's and the
full head's logits at those ids, and its fused draft grows the unfused draft's trees, all of
their tokens target ids of the vocabulary.

TRITON_INTERPRET must be set before Triton is imported, so the checks run in a subprocess: this
file run as a script prints one JSON line. The GPU half is tests/test_eagle_gpu.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

TOLERANCE = 1e-4  # fp32, relative to the reference's peak
SHAPES = {"d4-k4-n16": (4, 4, 16), "d4-k3-n12": (4, 3, 12), "d3-k2-n6": (3, 2, 6)}
# The fused draft's launches, derived: each of the D head runs (the feed, levels 2..D) is 7 for
# the forward (Triton GEMMs at these widths: fc, QKV, attention, o_proj, gate/up, down, the last
# add) + lm_head + the two top-K kernels = 10; the feed's index arithmetic 7 (positions, lengths,
# last row, the levels' positions and write rows); level 1 into the scratch 2 and its features
# made contiguous 1; one bookkeeping kernel per level 2..D; one rerank: 11D + 10 (d4: 54; d6: 76;
# with cuBLAS GEMMs 17D + 9). Slack for an op that a PyTorch version splits in two. The unfused
# draft: ~300 at d4.
DEPTH = 4
MAX_LAUNCHES = 11 * DEPTH + 10 + 4
VOCAB_SIZE, VOCAB_SHAPE = 96, "d4-k4-n16"  # a draft vocabulary of 96 of the 320 ids (every third + EOS)


@pytest.fixture(scope="module")
def result() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_fused_head_forward_matches_unfused(result, gemm):
    forward = result["forward"] if gemm == "triton" else result["forward_cublas"]
    for key in ("logits", "predicted", "key_rows", "value_rows"):
        assert forward[key] < TOLERANCE, forward


def test_draft_vocab_head_fused_matches_unfused(result):
    vocab = result["vocab"]
    for key in ("logits", "predicted", "key_rows", "value_rows"):
        assert vocab["forward"][key] < TOLERANCE, vocab["forward"]
    assert vocab["logits_width"] == VOCAB_SIZE and vocab["full_logits_at_ids"] < 1e-6, vocab
    draft = vocab["drafts"][VOCAB_SHAPE]
    assert draft["same_trees"] == draft["trees"] == 6 and draft["logprob_error"] < TOLERANCE, draft
    assert draft["tokens_in_vocab"], draft


def test_top_children_kernels_match_topk_of_log_softmax(result):
    assert result["top_children"]["same_tokens"], result["top_children"]
    assert result["top_children"]["logprob_error"] < 1e-5, result["top_children"]
    assert result["top_children"]["nan_tokens_in_range"], result["top_children"]


def test_drafted_trees_made_on_the_device_match_the_host_trees(result):
    """What the target verifies without the host (TorchBackend.step_device): ids, depths, masks."""
    assert result["tree_of"] == {"kernel": True, "torch": True}, result["tree_of"]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_draft_grows_the_same_trees(result, shape):
    draft = result["drafts"][shape]
    assert draft["trees"] == 3 * 2 and draft["same_trees"] == draft["trees"], draft
    assert draft["logprob_error"] < TOLERANCE, draft


def test_reset_keeps_what_a_captured_draft_reads(result):
    """A captured draft reads the head's cache and RoPE table by address: a reset that keeps the
    cache keeps the table, and one that replaces either bumps the generation (graphs recaptured).
    The H200 crash: the table was rebuilt at every reset (device "cuda" != the table's "cuda:0")
    and the graph of the previous prompt replayed on freed memory."""
    reset = result["reset"]
    assert reset["stale_replays"] == 0, reset
    assert reset["table_kept"] == reset["resets"] and reset["recaptures"] == 0, reset
    assert reset["recaptured_after_growth"], reset


def test_fused_draft_launches_few_kernels(result):
    launches = result["launches"]
    print(json.dumps(launches))
    assert launches["fused"] <= MAX_LAUNCHES, launches
    assert launches["fused"] * 3 < launches["unfused"], launches
    assert launches["fused_ops"]["triton:expand_level_kernel"] == DEPTH - 1, launches


# -- the checks, run as a script under TRITON_INTERPRET=1 ----------------------------------------

def _tiny_head(seed: int = 0):
    """A tiny random Llama target and an EAGLE head with random weights (not the near-identity
    start of make_eagle_head, whose zeroed projections would hide the attention)."""
    import torch
    from transformers import LlamaForCausalLM

    from treespec.models.checkpoint import tiny_random_config
    from treespec.models.eagle import make_eagle_head

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_random_config(320)).eval()
    head = make_eagle_head(model).eval()
    with torch.no_grad():
        for p in list(head.fc.parameters()) + list(head.layer.parameters()):
            p.normal_(0.0, 0.15) if p.dim() == 2 else p.uniform_(0.8, 1.2)
    return model, head


def _err(got, ref) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def check_forward(head, gemm: str = "auto") -> dict:
    """A tree step with a past (two sequences, different lengths, 14 rows: Triton GEMMs under
    "auto"): fused vs unfused (their logits over the head's draft vocabulary when it has one)."""
    import torch

    from treespec.models.fused_eagle import FusedEagleHead
    from treespec.plugins.tree_attention import ordered
    from treespec.plugins.tree_attention.ordered_check import random_tree

    gen = torch.Generator().manual_seed(1)
    core, batch, tokens, rows = head.core, 2, 7, 40
    lengths = torch.tensor([11, 5])
    key = torch.randn(batch, core.num_kv_heads, rows, core.head_dim, generator=gen)
    value = torch.randn(batch, core.num_kv_heads, rows, core.head_dim, generator=gen)
    mask = torch.stack([random_tree(tokens, gen)[1] for _ in range(batch)])
    pos = lengths[:, None] + mask.sum(-1) - 1
    feats = torch.randn(batch, tokens, head.hidden_size, generator=gen)
    ids = torch.randint(0, 320, (batch, tokens), generator=gen)
    with torch.no_grad():
        logits, predicted, new_key, new_value = head(feats, ids, pos, mask, lengths, key, value)
        fused = FusedEagleHead(head, gemm)
        ancestors, depths = ordered.tree_ancestors(mask)
        got = fused.forward(feats, ids, pos, lengths, lengths, ancestors, depths, key, value)
        got_logits = fused.logits(got)
    written = [(key[b, :, int(n):int(n) + tokens], value[b, :, int(n):int(n) + tokens]) for b, n in enumerate(lengths)]
    return {"logits": _err(got_logits.view(batch, tokens, -1), logits),
            "predicted": _err(got.view(batch, tokens, -1), predicted),
            "key_rows": _err(torch.stack([k for k, _ in written]), new_key),
            "value_rows": _err(torch.stack([v for _, v in written]), new_value)}


def check_top_children() -> dict:
    """The two-kernel top-K over a vocabulary of several chunks (ties included) against
    topk(log_softmax): same tokens, log-probs within 1e-5."""
    import torch

    from treespec.runtime.drafters.eagle2_kernels import top_children

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 2, 5000, generator=gen) * 4
    logits[0, 0, 4500] = logits[0, 0, 20] = 30.0  # a tie across chunks: the smaller id first
    lp, tok = top_children(logits, 8)
    ref_lp = torch.log_softmax(logits, -1)
    ref_tok = torch.sort(ref_lp, dim=-1, descending=True, stable=True).indices[..., :8]
    garbage = logits[:1].clone()
    garbage[0, 0, ::3] = float("nan")  # NaN logits (e.g. read from freed memory): ids stay in range
    garbage[0, 1] = float("nan")
    _, nan_tok = top_children(garbage, 8)
    return {"same_tokens": bool(torch.equal(tok, ref_tok)),
            "logprob_error": float((lp - torch.gather(ref_lp, -1, ref_tok)).abs().max()),
            "nan_tokens_in_range": bool(((nan_tok >= 0) & (nan_tok < 5000)).all())}


def check_tree_of() -> dict:
    """The trees the target verifies, made from a packed draft on the device: eagle2_kernels.tree_of
    (one launch) and eagle_tree.device_tree (PyTorch ops) against the host Tree of the same nodes."""
    import numpy as np
    import torch

    from treespec.runtime.drafters.eagle2_kernels import tree_of
    from treespec.runtime.drafters.eagle_tree import device_tree
    from treespec.runtime.trees.tree import Tree

    rng = np.random.default_rng(5)
    batch, n, depth = 3, 20, 5
    packed = np.zeros((batch, 3 * n), np.float32)
    trees = []
    for b in range(batch):  # parents first, no node deeper than `depth`
        parents, depths = [-1], [0]
        while len(parents) < n + 1:
            p = int(rng.integers(0, len(parents)))
            if depths[p] < depth:
                parents.append(p)
                depths.append(depths[p] + 1)
        tokens = rng.integers(0, 1000, n + 1).tolist()
        packed[b, :n], packed[b, n:2 * n] = tokens[1:], parents[1:]
        trees.append(Tree(tokens=tokens, parents=parents))
    roots = torch.tensor([t.tokens[0] for t in trees])
    want = [torch.tensor(np.stack([t.tokens for t in trees])), torch.tensor(np.stack([t.depths for t in trees])),
            torch.tensor(np.stack([t.ancestor_mask() for t in trees]))]
    same = {}
    for name, got in (("kernel", tree_of(torch.from_numpy(packed), roots, depth)),
                      ("torch", tuple(vars(device_tree(torch.from_numpy(packed), roots, depth)).values()))):
        same[name] = all(torch.equal(g, w) for g, w in zip(got, want))
    return same


def _drafters(head):
    from treespec.runtime.drafters.eagle_torch import TorchEagleDrafter, TorchEagleHead

    return {name: TorchEagleDrafter(TorchEagleHead(head, head.core.num_kv_heads, head.core.head_dim, "cpu",
                                                   fused=fused), head.hidden_size, top_k=4)
            for name, fused in (("fused", True), ("unfused", False))}


def _rounds(drafter, cfg, rounds: int = 3):
    """Three drafts of a ragged batch of two; between them each sequence accepts a path of the
    last tree (2 and 1 tokens) with random target features. Returns the trees."""
    import numpy as np

    from treespec.runtime.drafters.base import Features
    from treespec.runtime.trees.policies import draft_trees

    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 320, 9).tolist(), rng.integers(3, 320, 14).tolist()]
    roots = [7, 11]
    drafter.reset([p + [r] for p, r in zip(prompts, roots)], 128)
    hidden = rng.standard_normal((2, 14, drafter.hidden_size)).astype(np.float32)
    for b, p in enumerate(prompts):
        drafter.accept(b, [], Features(hidden, b, list(range(len(p)))))
    trees = []
    for _ in range(rounds):
        drafted = draft_trees(cfg, drafter, roots).trees
        trees += drafted
        hidden = rng.standard_normal((2, 3, drafter.hidden_size)).astype(np.float32)
        for b, tree in enumerate(drafted):
            path = tree.path_to(len(tree) - 1)[1:][:2 - b] or [0]
            new = [tree.tokens[n] for n in path]
            drafter.accept(b, new, Features(hidden, b, list(range(len(new)))))
            roots[b] = new[-1]
    return trees


def check_drafts(head, shapes=tuple(SHAPES)) -> dict:
    import numpy as np

    from treespec.runtime.trees.policies import parse_tree_config

    out = {}
    vocab = None if head.draft_vocab is None else set(head.draft_vocab.tolist())
    for name in shapes:
        depth, top_k, budget = SHAPES[name]
        cfg = parse_tree_config({"policy": "eagle2", "depth": depth, "top_k": top_k, "budget": budget})
        trees = {k: _rounds(d, cfg) for k, d in _drafters(head).items()}
        pairs = list(zip(trees["fused"], trees["unfused"]))
        same = sum((f.tokens, f.parents) == (u.tokens, u.parents) for f, u in pairs)
        err = max(float(np.abs(np.subtract(f.logprobs, u.logprobs)).max()) for f, u in pairs)
        out[name] = {"trees": len(pairs), "same_trees": same, "logprob_error": err}
        if vocab is not None:
            out[name]["tokens_in_vocab"] = all(set(t.tokens[1:]) <= vocab for t in trees["fused"])
    return out


def check_vocab(model, head) -> dict:
    """The checks above for a copy of `head` over a draft vocabulary, and its logits against the
    full head's at those ids (the [K, H] rows gathered once are the lm_head's rows)."""
    import copy

    import torch

    ids = torch.tensor(sorted(set(range(0, 3 * (VOCAB_SIZE - 1), 3)) | {model.config.eos_token_id}))
    small = copy.deepcopy(head).use_draft_vocab(ids)
    feats = torch.randn(2, 3, head.hidden_size, generator=torch.Generator().manual_seed(5))
    return {"forward": check_forward(small), "drafts": check_drafts(small, (VOCAB_SHAPE,)),
            "logits_width": small.lm_head.out_features,
            "full_logits_at_ids": _err(small.logits(feats), head.logits(feats)[..., ids])}


class LaunchCounter:
    """Counts the kernels a piece of PyTorch code launches, on any device: every aten op that
    is not a view or an allocation (a TorchDispatchMode), plus every Triton launch (the aten
    ops inside a launch, which the interpreter makes, are not counted)."""

    FREE = ("empty", "empty_like", "empty_strided", "new_empty", "detach", "lift_fresh", "_local_scalar_dense")

    def __init__(self):
        self.ops: Counter = Counter()

    def __enter__(self):
        import triton
        from torch.utils._python_dispatch import TorchDispatchMode

        counter, inside = self, [0]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                if not inside[0] and name not in LaunchCounter.FREE and not _aliases(func, args, out):
                    counter.ops[name] += 1
                return out

        def counted(run):
            def launch(fn, *args, **kwargs):
                counter.ops[f"triton:{getattr(fn, '__name__', 'kernel')}"] += 1
                inside[0] += 1
                try:
                    return run(fn, *args, **kwargs)
                finally:
                    inside[0] -= 1
            return launch

        from triton.runtime import interpreter, jit

        self._patched = [(cls, cls.run) for cls in (interpreter.InterpretedFunction, jit.JITFunction)]
        for cls, run in self._patched:
            cls.run = counted(run)
        self._mode = Mode()
        self._mode.__enter__()
        del triton
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for cls, run in self._patched:
            cls.run = run

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _aliases(func, args, out) -> bool:
    """A view op whose output shares its input's memory (aten.to is a 'view' that may copy)."""
    import torch

    if not func.is_view:
        return False
    if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
        return True
    return out.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr()


def check_reset(head) -> dict:
    """Resets of a fused head as a generator makes them (a prompt each, the cache kept), with the
    device named with an index ("cpu:0", as the loader's "cuda" is not the tensors' "cuda:0"):
    whether the RoPE table a captured draft would read survives, and whether the generation
    (what makes the drafter recapture) changes when it does not."""
    from treespec.runtime.drafters.eagle_torch import TorchEagleHead

    runner = TorchEagleHead(head, head.core.num_kv_heads, head.core.head_dim, "cpu:0", fused=True)
    runner.reset(1, 128)
    out = {"resets": 0, "table_kept": 0, "stale_replays": 0, "recaptures": 0}
    for capacity in (100, 128, 60):
        captured = (runner.fused.cos, runner.fused.sin, runner.key, runner.generation)
        runner.reset(1, capacity)
        same = runner.fused.cos is captured[0] and runner.fused.sin is captured[1] and runner.key is captured[2]
        out["resets"] += 1
        out["table_kept"] += int(same)
        out["stale_replays"] += int(not same and runner.generation == captured[3])
        out["recaptures"] += int(runner.generation != captured[3])
    generation = runner.generation
    runner.reset(1, 4096)  # a longer context: a new cache and table, so the graphs must go
    out["recaptured_after_growth"] = runner.generation != generation
    return out


def check_launches(head) -> dict:
    """Launches of one eagle2 draft (d4-k4-n16, batch 1), fused and unfused, after a warm draft."""
    import torch

    from treespec.runtime.drafters.eagle_tree import Eagle2Buffers, Eagle2Shape, eagle2_draft

    out = {}
    for name, drafter in _drafters(head).items():
        runner = drafter.torch_head
        runner.reset(1, 128)
        buf = Eagle2Buffers(Eagle2Shape(1, DEPTH, 4, 16), head.hidden_size, torch.float32, torch.device("cpu"))
        with torch.inference_mode():
            eagle2_draft(runner, buf)
            with LaunchCounter() as counter:
                eagle2_draft(runner, buf)
        out[name] = counter.total
        out[f"{name}_ops"] = dict(counter.ops.most_common())
    return out


def main() -> None:
    import torch

    model, head = _tiny_head()
    with torch.no_grad():
        result = {"forward": check_forward(head), "forward_cublas": check_forward(head, "cublas"),
                  "top_children": check_top_children(), "tree_of": check_tree_of(), "drafts": check_drafts(head),
                  "launches": check_launches(head), "reset": check_reset(head), "vocab": check_vocab(model, head)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Load-aware tree sizing and the elastic batch width of the batch engine (runtime/batch_sizing.py,
runtime/batching.py), on the engine directly (CPU, tiny random model).

The sizer's arithmetic on hand-made trees: the tokens a verified tree would have given cut to its
n best nodes, plain decoding chosen when verification is dear and drafts are rarely accepted, the
full tree when it is cheap and accepted. The engine: every output equals the request sent alone
(greedy: lossless) with the budgets it chose, for the lookup drafter (ONNX Runtime) and EAGLE
(torch, its whole-tree draft, per-slot state reset); one request runs at width 1, a burst grows
the width, and the verify-latency curve is measured per width.
"""
from __future__ import annotations

import threading

import pytest

from treespec.runtime.batch_sizing import EXPLORE_EVERY, PLAIN_RUN, RULE_OUT_AFTER, LoadSizer, sized, tokens_if_cut
from treespec.runtime.trees.auto import LatencyCurve
from treespec.runtime.trees.config import TreeConfig
from treespec.runtime.trees.tree import Tree
from treespec.runtime.verify import Verdict

MAX_TOKENS = 24
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
           "Explain what a CPU does in one sentence.", "Name a fruit that is yellow.", "What is 12 times 12?"]


def _tree() -> Tree:
    """root -> a (p 0.9), root -> b (p 0.37), a -> c (p 0.82): ranks a 0, c 1, b 2."""
    tree = Tree.root_only(7)
    a = tree.add(0, 1, -0.1)
    tree.add(0, 2, -1.0)
    tree.add(a, 3, -0.2)
    return tree


def test_tokens_if_cut_follows_the_ranks_of_the_accepted_path():
    tree = _tree()
    assert tokens_if_cut(tree, Verdict([0, 1, 3], [1, 3, 9]), [0, 1, 2, 3, 4]) == {0: 1, 1: 2, 2: 3, 3: 3}
    assert tokens_if_cut(tree, Verdict([0, 2], [2, 9]), [0, 1, 2, 3]) == {0: 1, 1: 1, 2: 1, 3: 2}
    assert tokens_if_cut(tree, Verdict([0], [9]), [0, 3]) == {0: 1, 3: 1}


def test_the_sizer_goes_plain_when_speculation_stops_paying_and_full_when_it_pays():
    steep, flat = LatencyCurve([1, 64], [1e-3, 64e-3]), LatencyCurve([1, 64], [1e-3, 1.1e-3])
    sizer = LoadSizer(64, curves={8: steep, 1: flat}, gain={0: 1.0, 2: 1.1, 16: 1.2, 63: 1.3})
    assert sizer.choose(8, 63) == 0  # 8 x 64 tokens cost 64x one token; 1.3 tokens per step do not pay
    knee = LatencyCurve([1, 16, 64], [1e-3, 1.2e-3, 8e-3])
    sizer = LoadSizer(64, curves={8: knee, 1: flat}, gain={0: 1.0, 2: 1.8, 16: 3.0, 63: 3.4})
    assert sizer.choose(1, 63) == 63  # nearly free at batch 1: the whole tree
    assert sizer.choose(8, 63) == 16  # at batch 8 the curve's knee: the tree that still fits before it
    chosen = [sizer.choose(8, 63) for _ in range(400)]
    # the full tree is still drafted now and then (estimates stay current), but its step costs 6.7x
    # the chosen one's at batch 8: every ~107 steps, not every EXPLORE_EVERY
    assert 2 <= chosen.count(63) <= 400 // EXPLORE_EVERY // 5
    assert [sizer.choose(1, 63) for _ in range(EXPLORE_EVERY)] == [63] * EXPLORE_EVERY
    assert sized(TreeConfig(policy="auto", budget=16), 8).policy == "opt"
    assert sized(TreeConfig(policy="eagle2", budget=63, depth=6, top_k=8), 16).budget == 16
    assert sized(TreeConfig(policy="eagle2", budget=63), 0).policy == "none"



def test_trees_pay_unless_the_load_rules_them_out_whatever_the_text():
    """pays() rules trees out at a width where no tree could beat plain decoding even with the best
    acceptance seen so far, or where plain decoding was the sizer's choice PLAIN_RUN times in a row for
    several requests' texts together: the load, not one request's text, stops the engine speculating."""
    flat, steep = LatencyCurve([1, 64], [1e-3, 1.1e-3]), LatencyCurve([1, 64], [1e-3, 64e-3])
    sizer = LoadSizer(64, curves={1: flat, 8: steep})
    assert sizer.pays(8, 63)  # nothing known yet: explore
    tree = _tree()
    sizer.record(1, 3, 0.1e-3, [(tree, Verdict([0], [9]))])
    assert sizer.pays(8, 3)  # one drafted step that accepted nothing rules nothing out
    sizer = LoadSizer(64, curves={1: flat, 8: steep})
    sizer.record(1, 3, 0.1e-3, [(tree, Verdict([0, 1, 3], [1, 3, 9]))])  # 3 tokens a step
    for _ in range(30):  # then a text the drafter does not know: the estimate falls to ~1 token a step
        sizer.record(1, 3, 0.1e-3, [(tree, Verdict([0], [9]))])
    assert sizer.gain[3] < 1.1 and sizer.best_gain[3] == 3.0
    assert sizer.choose(1, 3) == 0 and sizer.pays(1, 3)  # this text: plain; the load: trees may pay
    assert not sizer.pays(8, 3)  # at width 8 a token costs what a tree node costs: no tree ever pays
    sizer.curves[4] = flat
    for _ in range(PLAIN_RUN - 1):  # (the full tree still explored now and then)
        sizer.choose(4, 3)
        sizer.choose(1, 3)
    assert sizer.pays(4, 3)
    sizer.choose(4, 3)
    assert not sizer.pays(4, 3)  # plain decoding chosen PLAIN_RUN times in a row for 4 requests' texts
    assert sizer.pays(1, 3)  # one request's text alone never rules trees out


def test_drafts_are_priced_at_the_width_they_ran_at():
    """Drafting 8 trees costs more than drafting one: a width is priced with its own drafts (the nearest
    width's until it has some)."""
    flat = LatencyCurve([1, 64], [1e-3, 1.1e-3])
    sizer = LoadSizer(64, curves={1: flat, 8: flat})
    tree, good = _tree(), Verdict([0, 1, 3], [1, 3, 9])
    for _ in range(RULE_OUT_AFTER):
        sizer.record(1, 3, 0.2e-3, [(tree, good)])
    assert sizer.pays(1, 3) and sizer.pays(8, 3)  # 3 tokens for 1.2 ms, at width 8 too until drafted there
    for _ in range(3):
        sizer.record(8, 3, 10e-3, [(tree, good)])
    assert sizer.pays(1, 3) and not sizer.pays(8, 3)  # 3 tokens for 11 ms at width 8: plain's 1 ms wins


def test_one_slow_draft_a_graph_capture_does_not_price_the_tree_out():
    """The first draft of a shape captures its CUDA graph (tens of ms, measured on the H200): the
    sizer must not keep choosing plain decoding after the next few ordinary drafts (it did, with a
    moving average that plain steps never refreshed: budget 0 at every load in the first GPU run)."""
    flat = LatencyCurve([1, 64], [1e-3, 1.1e-3])
    sizer = LoadSizer(64, curves={1: flat}, gain={0: 1.0, 63: 3.4})
    tree = _tree()
    verdict = Verdict([0, 1, 3], [1, 3, 9])
    sizer.record(1, 63, 0.08, [(tree, verdict)])  # capture
    assert sizer.choose(1, 63) == 0  # with nothing else known, 80 ms of drafting does not pay
    for _ in range(2):
        sizer.record(1, 63, 0.9e-3, [(tree, verdict)])
    assert sizer.choose(1, 63) == 63

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from treespec.exporter.pipeline import ExportOptions, run_export

    out = tmp_path_factory.mktemp("sizing") / "tiny"
    run_export(ExportOptions(model="tiny-random", out=out, max_context=256, drafters=["lookup", "eagle"]),
               progress=lambda m: None)
    return out


def _run_engine(engine, gen, prompts: list[str]) -> dict[int, list[int]]:
    from treespec.runtime.api import check_request
    from treespec.runtime.batching import SlotRequest

    outs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    done = [threading.Event() for _ in prompts]
    for i, prompt in enumerate(prompts):
        def emit(ids, finished, i=i):
            outs[i].extend(ids)
            if finished:
                done[i].set()
            return True

        engine.submit(SlotRequest(gen.encode(prompt), MAX_TOKENS, gen.default_tree, check_request(MAX_TOKENS),
                                  None, emit, lambda exc: pytest.fail(f"engine failed: {exc}")))
    assert all(d.wait(300) for d in done)
    return outs


@pytest.mark.parametrize("backend, drafter, tree, device", [
    ("onnxruntime", "lookup", None, "cpu"), ("torch", "eagle", "eagle2-d4-k4-n16", "cpu"),
    pytest.param("torch", "eagle", "eagle2-d4-k4-n16", "cuda", marks=pytest.mark.gpu)])
def test_sized_batches_are_lossless_and_the_width_follows_demand(artifacts, backend, drafter, tree, device):
    from treespec.runtime.api import SpeculativeGenerator
    from treespec.runtime.batching import BatchEngine

    gen = SpeculativeGenerator.from_artifacts(artifacts, backend=backend, device=device, drafter=drafter, tree=tree)
    alone = {i: list(gen.generate(p, max_new_tokens=MAX_TOKENS).token_ids) for i, p in enumerate(PROMPTS)}
    engine = BatchEngine(gen.engine, 8, gen.manifest.profile("target").tree_tokens[2], budget=gen.default_tree.budget)
    try:
        assert _run_engine(engine, gen, PROMPTS[:1]) == {0: alone[0]}
        assert engine.stats.width == 1  # one request: a batch of one, like the Python API
        outs = _run_engine(engine, gen, PROMPTS)
        assert outs == alone
        # a burst grows the width to 8 (through 2 or 4 when the engine wakes between two submissions)
        assert engine.stats.width == 8 and {1, 8} <= set(engine.sizer.curves)
        # the sizer chose budgets at width 8, or found that no tree pays there (the tiny random drafters
        # accept next to nothing) and the batch decoded plainly
        assert engine.sizer.gain and (engine.sizer.steps > 0 or engine.stats.plain_under_load > 0)
        print(f"\n{drafter}: budgets {sorted(engine.sizer.gain)}, gain {engine.sizer.gain}, last {engine.stats.budget}")
    finally:
        engine.close()
        gen.close()


def _reuse_output_buffer(target) -> None:
    """Hand out the target's hidden states in one buffer that every step overwrites, as a CUDA graph's
    replay does (the CPU backend makes a fresh tensor each step)."""
    import dataclasses

    import torch

    from treespec.runtime.backends.device_tensors import LazyHost

    step, held = target.step, {}

    def reusing_step(inputs):
        out = step(inputs)
        hidden = out.hidden_states.tensor
        b, t = hidden.shape[:2]
        if "buf" not in held or held["buf"].shape[0] != b or held["buf"].shape[1] < t:
            held["buf"] = torch.empty(b, 512, *hidden.shape[2:], dtype=hidden.dtype)
        held["buf"][:, :t] = hidden
        return dataclasses.replace(out, hidden_states=LazyHost(held["buf"], out.hidden_states.rows))

    target.step = reusing_step


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_plain_steps_under_load_keep_the_drafters_features(artifacts, device):
    """The sizer may run plain steps (budget 0) for a while: the drafter then drafts nothing and its
    features wait. On CUDA the target's outputs live in a graph's static buffers, overwritten by the
    next step; features held by reference went stale there (the H200 server's EAGLE accepted 1.1 tokens
    a step against 2.5 alone). With outputs in one reused buffer, the head is fed what it is fed with
    fresh outputs: its KV cache ends equal (the tiny random head's trees barely depend on it), and the
    engine stays lossless. On CUDA the same run natively (graph outputs, the draft captured during the
    run, each catch-up's pinned rows brought over from the device in one copy)."""
    import numpy as np

    from treespec.runtime.api import SpeculativeGenerator
    from treespec.runtime.batching import BatchEngine

    caches = {}
    for reuse in (False, True):
        gen = SpeculativeGenerator.from_artifacts(artifacts, backend="torch", device=device, drafter="eagle",
                                                  tree="eagle2-d4-k4-n16")
        alone = [list(gen.generate(p, max_new_tokens=MAX_TOKENS).token_ids) for p in PROMPTS[:3]]
        if reuse and device == "cpu":
            _reuse_output_buffer(gen.target)
        # 4 slots stepped whatever the demand (a request alone at width 1 would keep its tree, unsized)
        engine = BatchEngine(gen.engine, 4, gen.manifest.profile("target").tree_tokens[2],
                             budget=gen.default_tree.budget, elastic=False)
        turns = iter(range(10**6))
        engine.sizer.choose = lambda width, full: full if next(turns) % 3 == 2 else 0  # 2 plain steps in 3
        engine.sizer.rule_out_after = 10**9  # the plain steps are this test's, never the load's
        try:  # one request at a time: the steps do not depend on when requests arrive
            assert [_run_engine(engine, gen, [p])[0] for p in PROMPTS[:3]] == alone
            head = engine.drafter.torch_head
            caches[reuse] = head.key[0, :, :int(head.lengths[0])].float().cpu().numpy().copy()
        finally:
            engine.close()
            gen.close()
    assert caches[True].shape == caches[False].shape and caches[True].shape[1] > MAX_TOKENS // 2
    np.testing.assert_allclose(caches[True], caches[False], atol=1e-5)


def test_requests_decode_plainly_where_the_load_rules_trees_out(artifacts):
    """Where a verified token costs as much as a drafted node (a step's time linear in its tokens), no
    tree can pay at any acceptance: after its first (drafted) step the running request goes plain for
    good, later requests are admitted plain (drafter untouched), and every output is the request alone."""
    from treespec.runtime.api import SpeculativeGenerator
    from treespec.runtime.batching import WIDTHS, BatchEngine

    gen = SpeculativeGenerator.from_artifacts(artifacts, backend="torch", device="cpu", drafter="eagle",
                                              tree="eagle2-d4-k4-n16")
    alone = {i: list(gen.generate(p, max_new_tokens=MAX_TOKENS).token_ids) for i, p in enumerate(PROMPTS)}
    engine = BatchEngine(gen.engine, 8, gen.manifest.profile("target").tree_tokens[2], budget=gen.default_tree.budget)
    engine.sizer.curves = {w: LatencyCurve([1, 64], [1e-3 * w, 64e-3 * w]) for w in WIDTHS}  # linear in tokens
    engine.sizer.rule_out_after = 1  # (8 drafted steps by default; this linear curve explores once a request)
    try:
        assert _run_engine(engine, gen, PROMPTS[:1]) == {0: alone[0]}
        assert engine.sizer.best_gain and engine.stats.plain_under_load == 1  # drafted once, then plain
        assert _run_engine(engine, gen, PROMPTS) == alone
        assert engine.stats.plain_under_load == 1 + len(PROMPTS)
    finally:
        engine.close()
        gen.close()

"""The default tree on a CPU: `auto` sized before drafting, falling back to plain steps.

On a CPU a verify step grows with the tree and a drafted level costs part of a target step, so a
request that names no tree gets `auto` with the budget planned before drafting
(runtime/trees/auto.py machine_default_tree, AutoPlanner.plan). The promises: the GPU default is
untouched; the planner sizes trees from the latency curve, drafting costs and calibrated
acceptance, down to a plain step (with ever rarer probes) when nothing pays; and every default on
the CPU decodes token for token what `--tree none` decodes (real tiny exports, ONNX Runtime).
"""
from __future__ import annotations

import time

import pytest

from treespec.artifacts import load_manifest
from treespec.runtime.api import SpeculativeGenerator
from treespec.runtime.trees.auto import AutoPlanner, LatencyCurve, StepShape, machine_default_tree
from treespec.runtime.trees.config import parse_tree_config

NEW_TOKENS = 16
GPU_EAGLE = {"policy": "eagle2", "depth": 5, "top_k": 6, "budget": 31}
STEEP = LatencyCurve([1, 2, 4, 8, 16, 32], [0.01, 0.03, 0.06, 0.12, 0.24, 0.48])  # every token costs
FLAT = LatencyCurve([1, 32], [0.01, 0.0101])  # verifying more is nearly free


def test_cpu_gets_auto_planned_ahead_and_cuda_keeps_the_manifest_tree():
    cpu = machine_default_tree(GPU_EAGLE, "eagle", "cpu")
    assert cpu["policy"] == "auto" and cpu["plan"] == "ahead"
    cfg = parse_tree_config(cpu)
    assert cfg.plan == "ahead" and cfg.budget <= 16 and cfg.levels <= 8
    assert machine_default_tree(GPU_EAGLE, "eagle", "cuda") == GPU_EAGLE
    assert machine_default_tree({"policy": "none"}, None, "cpu") == {"policy": "none"}
    with pytest.raises(Exception, match="'plan' must be one of after, ahead"):
        parse_tree_config({"policy": "auto", "plan": "before"})


def _drafted(planner: AutoPlanner, values: list[float], depths: list[int], draft_s: float) -> int:
    planner.plan()
    return planner.drafted([values], [depths], draft_s, max(depths, default=0))


def test_planner_falls_back_to_plain_steps_and_probes_ever_more_rarely():
    """A drafter whose trees never pay here (steep curve, costly levels, unlikely nodes): plain
    steps, with a small probe after 1, 2, 4, ... plain steps."""
    planner = AutoPlanner(STEEP, 8, 4)
    first = planner.plan()
    assert first.budget > 0  # nothing known yet: draft once to learn
    planner.drafted([[-3.0, -4.0]], [[1, 2]], 0.02, 2)
    shapes = [planner.plan() for _ in range(7)]
    plain = StepShape(0, 0)
    probe = StepShape(2, 1)
    assert shapes[:3] == [plain, probe, plain]  # a probe: plan() called, nothing drafted in between
    planner = AutoPlanner(STEEP, 8, 4)
    _drafted(planner, [-3.0, -4.0], [1, 2], 0.02)
    pattern = []
    for _ in range(12):
        shape = planner.plan()
        pattern.append(shape.budget)
        if shape.budget:
            planner.drafted([[-3.0]], [[1]], 0.02, 1)
    assert pattern == [0, 2, 0, 0, 2, 0, 0, 0, 0, 2, 0, 0]


def test_planner_grows_trees_that_pay_and_keeps_them_within_the_caps():
    planner = AutoPlanner(FLAT, 8, 4)
    shape = planner.plan()
    for _ in range(6):
        values = [-0.05 * (i + 1) for i in range(shape.budget)]  # confident drafter
        depths = [min(i + 1, shape.levels) for i in range(shape.budget)]
        keep = planner.drafted([values], [depths], 1e-4, shape.levels)
        assert keep == shape.budget  # a flat curve: verify every drafted node
        shape = planner.plan()
    assert shape == StepShape(8, 4)


def test_a_free_drafter_drafts_to_the_caps_and_is_cut_after():
    planner = AutoPlanner(STEEP, 16, 8)
    planner.plan()
    planner.drafted([[-5.0]], [[1]], 1e-7, 1)
    assert planner.plan() == StepShape(16, 8)  # drafting costs nothing: draft all, cut after


def test_step_costs_follow_the_load():
    """The curve is measured once; steps measured slower than it scale every option alike."""
    planner = AutoPlanner(STEEP, 8, 4)
    planner.costs.planned(1)
    time.sleep(0.03)  # a plain step that took 3x the curve's 10 ms
    planner.costs.start_step()
    assert planner.costs.scale > 1.2


@pytest.fixture(scope="module")
def tiny_gens(tiny_artifacts, bench_prompts):
    drafters = list(load_manifest(tiny_artifacts).drafters)
    gens = {d: SpeculativeGenerator.from_artifacts(tiny_artifacts, drafter=d, threads=1) for d in drafters}
    prompts = [gens["lookup"].encode(p) for p in bench_prompts[:2]] + [[5, 6, 7, 8] * 6]
    alone = [gens["lookup"].generate(p, max_new_tokens=NEW_TOKENS, tree="none").token_ids for p in prompts]
    yield gens, prompts, alone
    for gen in gens.values():
        gen.close()


def test_every_cpu_default_is_lossless(tiny_gens):
    gens, prompts, alone = tiny_gens
    for name, gen in gens.items():
        assert gen.default_tree.policy == "auto" and gen.default_tree.plan == "ahead", name
        got = [gen.generate(p, max_new_tokens=NEW_TOKENS).token_ids for p in prompts]
        assert got == alone, name
        assert gen.engine.planner is not None and gen.engine.stats.budgets, name


def test_a_drafter_that_cannot_pay_falls_back_to_plain_steps_losslessly(tiny_gens):
    """Verifying is made to look ruinous: the planner plans plain steps (budget 0, trees of the
    root alone) after its first look, and the output is still plain decoding's."""
    gens, prompts, alone = tiny_gens
    gen = gens["draft"] if "draft" in gens else gens["lookup"]
    gen.engine.latency = LatencyCurve([1, 2, 64], [0.001, 10.0, 20.0])
    gen.engine.planner = None
    try:
        got = [gen.generate(p, max_new_tokens=NEW_TOKENS).token_ids for p in prompts]
        budgets = gen.engine.stats.budgets
    finally:
        gen.engine.latency = gen.engine.planner = None
    assert got == alone
    assert budgets.count(0) >= len(budgets) - 3  # plain steps but the rare probes
    assert gen.engine.stats.as_dict()["mean_tree_size"] < 1.5

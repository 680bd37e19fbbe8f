"""Property-based fuzzing of tree configs and tree construction (issue 8, item 2).

Random tree configs (every policy, valid and invalid values, junk types, unknown fields) go
through parse_tree_config + build_trees with the real lookup drafter, and through the runtime on
the tiny model. Properties:
  * the only failure is InputError, for an invalid config;
  * every built tree is valid: root first, parents before children, depths consistent, the
    attention mask is exactly the ancestor relation, batch padding sees only itself;
  * the node budget (and the policy's own bounds: widths per level, branching, choice paths,
    depth) is respected;
  * greedy output equals plain decoding (tree none) on the tiny model.
Examples are few (CPU budget) but derandomized, so CI always runs the same ones.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treespec.runtime.drafters.lookup import LookupDrafter
from treespec.errors import InputError
from treespec.runtime.trees.config import MAX_DEPTH, MAX_NODES
from treespec.runtime.trees.policies import POLICIES, TreeConfig, build_trees, parse_tree_config
from treespec.runtime.trees.tree import Tree
from support.tree_checks import assert_batch_inputs, assert_tree_structure

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RUNTIME = settings(FUZZ, max_examples=20)
PROFILE_TREE_TOKENS = 128

# -- strategies ----------------------------------------------------------------------------------

small = st.integers(-3, 12)
junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=3), st.integers(-10 ** 6, 10 ** 6), st.lists(small, max_size=3),
                 st.dictionaries(st.text(max_size=2), small, max_size=2))
path = st.lists(st.integers(-1, 4), max_size=4)

# Arbitrary dicts: any subset of the fields, each of the right shape or junk; mostly invalid.
arbitrary_configs = st.one_of(
    st.fixed_dictionaries({}, optional={
        "policy": st.one_of(st.sampled_from(POLICIES + ("bushy", "", "Widths")), junk),
        "widths": st.one_of(st.lists(small, max_size=6), junk),
        "depth": st.one_of(small, junk),
        "branching": st.one_of(small, junk),
        "choices": st.one_of(st.lists(path, max_size=10), junk),
        "budget": st.one_of(st.integers(-2, 140), junk),
        "delta": st.one_of(st.floats(-1, 2), junk),
        "max_depth": st.one_of(st.integers(-1, 10), junk),
        "name": st.text(max_size=5),
        "colour": junk,
    }),
    junk,
    st.sampled_from(["none", None]),
)


@st.composite
def valid_configs(draw, max_depth: int = 6):
    """Configs that parse, of every policy, sized around the graph profile."""
    policy = draw(st.sampled_from(POLICIES))
    raw: dict = {"policy": policy}
    if policy == "widths":
        raw["widths"] = draw(st.lists(st.integers(1, 8), min_size=1, max_size=max_depth))
    elif policy == "depth_branching":
        raw["depth"] = draw(st.integers(1, min(4, max_depth)))
        raw["branching"] = draw(st.integers(1, 3))
    elif policy == "choices":
        paths = draw(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=max_depth), min_size=1, max_size=8))
        closed = {tuple(p[:n]) for p in paths for n in range(1, len(p) + 1)}  # every prefix present
        raw["choices"] = [list(p) for p in draw(st.permutations(sorted(closed)))]
    elif policy == "opt":
        raw["delta"] = draw(st.sampled_from([0.0, 0.01, 0.05, 0.3]))
    elif policy == "eagle2":
        raw.update(depth=draw(st.integers(1, min(5, max_depth))), top_k=draw(st.integers(1, 5)))
    if policy != "none" and draw(st.booleans()):
        raw["budget"] = draw(st.integers(1, 60))
    if policy != "none" and draw(st.booleans()):
        raw["max_depth"] = draw(st.integers(1, 8))
    return raw


any_config = st.one_of(valid_configs(), arbitrary_configs)


@st.composite
def contexts(draw):
    """Token contexts with repeats (so the lookup drafter finds n-grams and trees branch)."""
    alphabet = draw(st.integers(2, 12))
    n = draw(st.integers(1, 2))
    return [draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=60)) for _ in range(n)]


# -- checks ----------------------------------------------------------------------------------------

def parse_or_none(raw):
    """parse_tree_config's only refusal is InputError (anything else fails the test)."""
    try:
        return parse_tree_config(raw)
    except InputError as exc:
        assert str(exc), "an InputError must say what is wrong"
        return None


def check_tree(tree: Tree, cfg: TreeConfig, vocab: set[int]) -> None:
    n = len(tree)
    assert_tree_structure(tree)
    for i in range(1, n):
        assert tree.tokens[i] in vocab, "drafted tokens come from the context"
        assert np.isfinite(tree.logprobs[i]) and tree.logprobs[i] <= 1e-9
    for node, kids in enumerate(tree.children):  # siblings carry distinct tokens (no duplicate branches)
        assert len({tree.tokens[k] for k in kids}) == len(kids)
    # budget and the policy's own bounds
    drafted = n - 1
    assert drafted <= cfg.budget
    assert n <= cfg.max_nodes
    depth = max(tree.depths)
    assert depth <= max(cfg.levels, 0)
    per_level = np.bincount(tree.depths, minlength=depth + 1)
    if cfg.policy == "none":
        assert n == 1
    elif cfg.policy == "widths":
        assert all(per_level[d] <= cfg.widths[d - 1] for d in range(1, depth + 1))
    elif cfg.policy == "depth_branching":
        assert all(len(kids) <= cfg.branching for kids in tree.children)
        assert depth <= cfg.depth
    elif cfg.policy == "choices":
        lengths = [len(c) for c in cfg.choices]
        assert all(per_level[d] <= lengths.count(d) for d in range(1, depth + 1))
    elif cfg.policy == "opt":
        assert depth <= cfg.max_depth


def check_batch_inputs(trees: list[Tree]) -> None:
    past = np.arange(len(trees), dtype=np.int64) * 3
    ids, pos, mask = assert_batch_inputs(trees, past)
    width = max(len(t) for t in trees)
    assert ids.shape == pos.shape == (len(trees), width) and mask.shape == (len(trees), width, width)


def build_and_check(raw, ctxs: list[list[int]]) -> None:
    cfg = parse_or_none(raw)
    if cfg is None:
        return
    drafter = LookupDrafter(max_ngram=3, top_k=4)
    drafter.reset(ctxs, capacity=256)
    trees = build_trees(cfg, drafter, [c[-1] for c in ctxs])
    assert len(trees) == len(ctxs)
    for tree, ctx in zip(trees, ctxs):
        assert tree.tokens[0] == ctx[-1]
        check_tree(tree, cfg, set(ctx))
    check_batch_inputs(trees)
    # The drafter can keep going after a step: accept a drafted path and build again.
    tree = trees[0]
    leaf = max(range(len(tree)), key=lambda i: tree.depths[i])
    accepted = [tree.tokens[i] for i in tree.path_to(leaf)[1:]] + [ctxs[0][-1]]
    drafter.accept(0, accepted, np.zeros(1))
    for b, again in enumerate(build_trees(cfg, drafter, [accepted[-1]] + [c[-1] for c in ctxs[1:]])):
        check_tree(again, cfg, set(ctxs[b]) | set(accepted))


# -- parse + build (no model) ----------------------------------------------------------------------

@FUZZ
@given(raw=arbitrary_configs, ctxs=contexts())
def test_fuzz_arbitrary_configs_parse_and_build(raw, ctxs):
    build_and_check(raw, ctxs)


@FUZZ
@given(raw=valid_configs(), ctxs=contexts())
def test_fuzz_valid_configs_build_valid_trees(raw, ctxs):
    assert parse_tree_config(raw) is not None
    build_and_check(raw, ctxs)


huge = st.one_of(st.integers(-10 ** 18, 10 ** 18), st.integers(0, 1 << 200), st.integers(1, 70))
SIZE_FIELDS = ("depth", "branching", "budget", "max_depth", "max_width", "min_width", "top_k")


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(raw=st.fixed_dictionaries({"policy": st.sampled_from(POLICIES)},
                                 optional={**{k: huge for k in SIZE_FIELDS},
                                           "widths": st.lists(huge, max_size=200),
                                           "choices": st.lists(st.lists(huge, max_size=100), max_size=50)}))
def test_fuzz_huge_sizes_are_bounded_and_fast(raw):
    """Issue 14: any size, however large, is parsed or refused in milliseconds, and what parses is
    within the hard caps (so building it is bounded too)."""
    start = time.perf_counter()
    cfg = parse_or_none(raw)
    if cfg is not None:
        assert cfg.levels <= MAX_DEPTH and cfg.max_nodes <= MAX_NODES + 1 and cfg.budget <= MAX_NODES
    assert time.perf_counter() - start < 0.25


def test_known_invalid_configs_are_input_errors():
    """Fixed regressions next to the fuzzing: each is refused with an InputError."""
    for raw in ({"policy": "widths", "widths": [0]}, {"policy": "widths", "widths": [3, -1]},
                {"policy": "widths", "widths": "4,4"}, {"policy": "depth_branching", "depth": 0, "branching": 2},
                {"policy": "depth_branching", "depth": 2, "branching": -1}, {"policy": "choices", "choices": []},
                {"policy": "choices", "choices": [[0, 1]]}, {"policy": "choices", "choices": [[-1]]},
                {"policy": "opt", "delta": -0.1}, {"policy": "opt", "budget": 0}, {"policy": "opt", "budget": True},
                {"policy": "opt", "max_depth": 2.5}, {"policy": "opt", "colour": 1}, {"policy": None}, [], 7):
        with pytest.raises(InputError):
            parse_tree_config(raw)


# -- the runtime on the tiny model -------------------------------------------------------------------

PROMPTS = [[7, 8, 9, 10, 11] * 6, [3, 4, 3, 4, 5, 3, 4, 3, 4, 5, 6] * 2]
NEW_TOKENS = 12


def _runtime(artifacts, drafter: str):
    """A generator with `drafter` on the tiny model and the prompts' plain (--tree none) outputs."""
    from treespec.runtime.api import SpeculativeGenerator

    gen = SpeculativeGenerator.from_artifacts(artifacts, drafter=drafter, threads=1)
    plain = [gen.generate(p, max_new_tokens=NEW_TOKENS, tree="none").token_ids for p in PROMPTS]
    yield gen, plain
    gen.close()


@pytest.fixture(scope="module")
def lookup_runtime(tiny_artifacts):
    yield from _runtime(tiny_artifacts, "lookup")


@pytest.fixture(scope="module")
def medusa_runtime(tiny_artifacts):
    yield from _runtime(tiny_artifacts, "medusa")


def run_and_check(gen, plain, raw, batch: bool) -> None:
    # The API reads tree=None as "the drafter's default tree" (parse_tree_config: policy none).
    expect_error = raw is not None and parse_or_none(raw) is None
    try:
        if batch:
            got = [r.token_ids for r in gen.generate_batch(PROMPTS, max_new_tokens=NEW_TOKENS, tree=raw)]
        else:
            got = [gen.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, tree=raw).token_ids]
    except InputError as exc:
        cfg = gen.default_tree if raw is None else parse_or_none(raw)
        # Refused: invalid config, or valid but over the graph profile / the Medusa heads.
        assert expect_error or cfg.max_nodes > PROFILE_TREE_TOKENS or (
            cfg.policy == "choices" and gen.drafter.max_depth is not None and cfg.levels > gen.drafter.max_depth
        ) or (isinstance(raw, str) and raw != "none"), (raw, exc)
        return
    assert not expect_error, f"accepted an invalid tree config {raw!r}"
    assert got == plain[: len(got)], (raw, got, plain)
    cfg = gen.default_tree if raw is None else parse_tree_config(raw)
    sizes = gen.engine.stats.tree_sizes
    assert all(1 <= s <= min(cfg.max_nodes, 1 + cfg.budget) for s in sizes), (raw, sizes)


@RUNTIME
@given(raw=any_config, batch=st.booleans())
def test_fuzz_runtime_lookup_lossless(lookup_runtime, raw, batch):
    gen, plain = lookup_runtime
    run_and_check(gen, plain, raw, batch)


@settings(RUNTIME, max_examples=12)
@given(raw=st.one_of(valid_configs(max_depth=6), arbitrary_configs), batch=st.booleans())
def test_fuzz_runtime_medusa_lossless(medusa_runtime, raw, batch):
    """Medusa: the graph has 4 heads; deeper choice trees must be refused, others lossless."""
    gen, plain = medusa_runtime
    run_and_check(gen, plain, raw, batch)

"""Tree configs: the YAML/JSON dicts that name a tree policy, parsed and checked (see
runtime/trees/policies.py for what each policy does with a drafter's candidates).

Parsing is bounded by construction (issue 14): every size is checked against a hard cap before
anything is built or summed, so a 90-byte config such as depth 10^9 is refused in microseconds
instead of holding the model for minutes. One validator per policy lives in POLICY_SPECS; a new
policy is one entry there (plus its fields on TreeConfig). Error messages never echo a whole
input value (`show_value` keeps them to about 80 characters).
"""
from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable

from treespec.errors import InputError

DEFAULT_MAX_DEPTH = 8
LOGPROB_FLOOR = -1e4  # a drafter's -inf / NaN log-probability is stored as this (finite)
# Hard caps, far above any useful tree (verification graphs allow 128 tree tokens by default).
MAX_DEPTH = 64  # drafted levels
MAX_WIDTH = 1024  # nodes per level, children per node, a top-k index
MAX_NODES = 4096  # drafted nodes in one tree (budget, choice paths)
SHOWN_CHARS = 80
AUTO_PLANS = ("after", "ahead")  # auto: budget chosen after drafting (cut) or before (sized)

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 4, 40, 40


def show_value(value: Any) -> str:
    """A short repr for error messages: bounded in depth, items and characters."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer over Python's 4300-digit str() limit
        return "an integer too large to show"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def show_text(text: str) -> str:
    """A user's string for error messages, cut to about 80 characters."""
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


@dataclass
class TreeConfig:
    policy: str = "none"
    widths: list[int] = field(default_factory=list)
    depth: int = 0
    branching: int = 0
    choices: list[list[int]] = field(default_factory=list)
    budget: int = 64
    delta: float = 0.0
    max_depth: int = DEFAULT_MAX_DEPTH
    # adaptive
    max_width: int = 8
    min_width: int = 1
    confident: float = 0.8  # top-1 probability at or above which a level gets min_width nodes
    unsure: float = 0.3  # top-1 probability at or below which a level gets max_width nodes
    min_path_prob: float = 0.05  # no new level once the best path's probability is below this
    top_k: int = 8  # eagle2: children drafted per expanded node, and nodes expanded per level
    plan: str = "after"  # auto: cut the drafted tree ("after"), or size it before drafting ("ahead")
    sample_children: bool = False

    @property
    def levels(self) -> int:
        """Upper bound on the tree depth (drafted levels)."""
        if self.policy == "none":
            return 0
        natural = {"widths": len(self.widths), "depth_branching": self.depth,
                   "choices": max((len(c) for c in self.choices), default=0)}.get(self.policy, self.max_depth)
        return min(natural, self.max_depth)

    @property
    def max_nodes(self) -> int:
        """Upper bound on tree size, root included (sizes the graph profile)."""
        levels = self.levels
        if self.policy == "none":
            return 1
        if self.policy == "widths":
            return 1 + min(sum(self.widths[:levels]), self.budget)
        if self.policy == "depth_branching":
            return 1 + min(full_tree_nodes(levels, self.branching), self.budget)
        if self.policy == "choices":
            return 1 + min(sum(1 for c in self.choices if len(c) <= levels), self.budget)
        return 1 + self.budget


def full_tree_nodes(depth: int, branching: int) -> int:
    """Drafted nodes of a full tree, stopping once over MAX_NODES (never a huge sum or power)."""
    total, level = 0, 1
    for _ in range(min(depth, MAX_DEPTH)):
        level *= branching
        total += level
        if total > MAX_NODES:
            return total
    return total


# -- field checks ------------------------------------------------------------------------------------

def bounded_int(raw: dict, key: str, cap: int, default: int | None = None) -> int:
    """A positive integer field, at most `cap`."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"tree config: '{key}' must be a positive integer, got {show_value(value)}")
    if value > cap:
        raise InputError(f"tree config: '{key}' is {show_value(value)}, over the cap of {cap}")
    return value


def probability(raw: dict, key: str, default: float) -> float:
    value = raw.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0.0 <= value <= 1.0):
        raise InputError(f"tree config: '{key}' must be a number in [0, 1], got {show_value(value)}")
    return float(value)


def _list_of(raw: dict, key: str, what: str, cap: int) -> list:
    value = raw.get(key)
    if not isinstance(value, list) or not value:
        raise InputError(f"tree config: '{key}' must be a non-empty list of {what}")
    if len(value) > cap:
        raise InputError(f"tree config: '{key}' has {len(value)} entries, over the cap of {cap}")
    return value


# -- one validator per policy: fill the policy's fields, return the tree's natural depth ----------------

def _none(raw: dict, cfg: TreeConfig) -> int:
    return DEFAULT_MAX_DEPTH


def _widths(raw: dict, cfg: TreeConfig) -> int:
    widths = _list_of(raw, "widths", "positive integers", MAX_DEPTH)
    cfg.widths = [bounded_int({"widths": w}, "widths", MAX_WIDTH) for w in widths]
    _default_budget(raw, cfg, sum(cfg.widths), "the widths")
    return len(cfg.widths)


def _depth_branching(raw: dict, cfg: TreeConfig) -> int:
    cfg.depth = bounded_int(raw, "depth", MAX_DEPTH)
    cfg.branching = bounded_int(raw, "branching", MAX_WIDTH)
    _default_budget(raw, cfg, full_tree_nodes(cfg.depth, cfg.branching),
                    f"a full tree of depth {cfg.depth} and branching {cfg.branching}")
    return cfg.depth


def _choices(raw: dict, cfg: TreeConfig) -> int:
    choices = _list_of(raw, "choices", "index paths", MAX_NODES)
    seen = set()
    for path in choices:
        if (not isinstance(path, list) or not path or len(path) > MAX_DEPTH
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_WIDTH for i in path)):
            raise InputError(f"tree config: choice {show_value(path)} must be a non-empty list of at most "
                             f"{MAX_DEPTH} indices in [0, {MAX_WIDTH})")
        seen.add(tuple(path))
    for path in seen:
        if len(path) > 1 and path[:-1] not in seen:
            raise InputError(f"tree config: choice {show_value(list(path))} has no parent "
                             f"{show_value(list(path[:-1]))}")
    cfg.choices = sorted((list(p) for p in seen), key=lambda p: (len(p), p))
    cfg.budget = bounded_int(raw, "budget", MAX_NODES, len(cfg.choices))
    return max(len(p) for p in cfg.choices)


def _opt(raw: dict, cfg: TreeConfig) -> int:
    delta = raw.get("delta", 0.0)
    if (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta)
            or delta < 0):
        raise InputError(f"tree config: 'delta' must be a number >= 0, got {show_value(delta)}")
    cfg.delta = float(delta)
    return DEFAULT_MAX_DEPTH


def _auto(raw: dict, cfg: TreeConfig) -> int:
    plan = raw.get("plan", "after")
    if plan not in AUTO_PLANS:
        raise InputError(f"tree config: 'plan' must be one of {', '.join(AUTO_PLANS)}, got {show_value(plan)}")
    cfg.plan = plan
    return _opt(raw, cfg)


def _adaptive(raw: dict, cfg: TreeConfig) -> int:
    cfg.max_width = bounded_int(raw, "max_width", MAX_WIDTH, 8)
    cfg.min_width = bounded_int(raw, "min_width", MAX_WIDTH, 1)
    if cfg.min_width > cfg.max_width:
        raise InputError(f"tree config: 'min_width' ({cfg.min_width}) is over 'max_width' ({cfg.max_width})")
    cfg.confident = probability(raw, "confident", 0.8)
    cfg.unsure = probability(raw, "unsure", 0.3)
    if cfg.unsure >= cfg.confident:
        raise InputError(f"tree config: 'unsure' ({cfg.unsure}) must be below 'confident' ({cfg.confident})")
    cfg.min_path_prob = probability(raw, "min_path_prob", 0.05)
    return DEFAULT_MAX_DEPTH


def _eagle2(raw: dict, cfg: TreeConfig) -> int:
    cfg.depth = bounded_int(raw, "depth", MAX_DEPTH)
    cfg.top_k = bounded_int(raw, "top_k", MAX_WIDTH, 8)
    return cfg.depth


def _default_budget(raw: dict, cfg: TreeConfig, natural: int, what: str) -> None:
    """The budget defaults to the tree's natural size, which must then be within MAX_NODES."""
    if "budget" not in raw and natural > MAX_NODES:
        raise InputError(f"tree config: {what} would have more than {MAX_NODES} nodes (the cap): "
                         "make it smaller or set 'budget'")
    cfg.budget = bounded_int(raw, "budget", MAX_NODES, natural)


@dataclass(frozen=True)
class PolicySpec:
    fields: frozenset[str]  # the policy's own fields (besides COMMON_FIELDS)
    validate: Callable[[dict, TreeConfig], int]  # fills cfg, returns the natural depth


POLICY_SPECS: dict[str, PolicySpec] = {
    "none": PolicySpec(frozenset(), _none),
    "widths": PolicySpec(frozenset({"widths"}), _widths),
    "depth_branching": PolicySpec(frozenset({"depth", "branching"}), _depth_branching),
    "choices": PolicySpec(frozenset({"choices"}), _choices),
    "opt": PolicySpec(frozenset({"delta"}), _opt),
    "adaptive": PolicySpec(frozenset({"max_width", "min_width", "confident", "unsure", "min_path_prob"}),
                           _adaptive),
    "auto": PolicySpec(frozenset({"delta", "plan"}), _auto),
    "eagle2": PolicySpec(frozenset({"depth", "top_k"}), _eagle2),
}
POLICIES = tuple(POLICY_SPECS)
COMMON_FIELDS = {"policy", "name", "description", "budget", "max_depth", "sample_children"}
POLICY_FIELDS = {name: set(spec.fields) for name, spec in POLICY_SPECS.items()}
ALL_FIELDS = COMMON_FIELDS.union(*POLICY_FIELDS.values())


def parse_tree_config(raw: Any) -> TreeConfig:
    """Validate a tree config dict; every problem is an InputError naming the field."""
    if raw is None or (isinstance(raw, str) and raw == "none"):
        return TreeConfig()
    if not isinstance(raw, dict):
        raise InputError(f"tree config must be a mapping, got {type(raw).__name__}")
    policy = raw.get("policy")
    if not isinstance(policy, str) or policy not in POLICY_SPECS:
        raise InputError(f"tree config: unknown policy {show_value(policy)} (choose from {', '.join(POLICIES)})")
    unknown = [key for key in raw if key not in ALL_FIELDS]
    if unknown:
        names = ", ".join(sorted(show_value(k) if not isinstance(k, str) else k[:40] for k in unknown[:8]))
        raise InputError(f"tree config: unknown field(s) {names}"[:SHOWN_CHARS * 2])
    cfg = TreeConfig(policy=policy)
    cfg.budget = bounded_int(raw, "budget", MAX_NODES, 64)
    sample = raw.get("sample_children", False)
    if not isinstance(sample, bool):
        raise InputError(f"tree config: 'sample_children' must be true or false, got {show_value(sample)}")
    cfg.sample_children = sample
    natural_depth = POLICY_SPECS[policy].validate(raw, cfg)
    cfg.max_depth = bounded_int(raw, "max_depth", MAX_DEPTH, natural_depth)
    return cfg

"""Tree configs: the YAML/JSON dicts that name a tree policy, parsed and checked (see
runtime/trees/policies.py for what each policy does with a drafter's candidates)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from treespec.errors import InputError

POLICIES = ("none", "widths", "depth_branching", "choices", "opt", "adaptive", "auto")
COMMON_FIELDS = {"policy", "name", "description", "budget", "max_depth", "sample_children"}
POLICY_FIELDS = {
    "none": set(),
    "widths": {"widths"},
    "depth_branching": {"depth", "branching"},
    "choices": {"choices"},
    "opt": {"delta"},
    "adaptive": {"max_width", "min_width", "confident", "unsure", "min_path_prob"},
    "auto": {"delta"},
}
ALL_FIELDS = COMMON_FIELDS.union(*POLICY_FIELDS.values())
DEFAULT_MAX_DEPTH = 8
LOGPROB_FLOOR = -1e4  # a drafter's -inf / NaN log-probability is stored as this (finite)


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
            return 1 + min(sum(self.branching ** d for d in range(1, levels + 1)), self.budget)
        if self.policy == "choices":
            return 1 + min(sum(1 for c in self.choices if len(c) <= levels), self.budget)
        return 1 + self.budget


def _positive_int(raw: dict, key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"tree config: '{key}' must be a positive integer, got {value!r}")
    return value


def _probability(raw: dict, key: str, default: float) -> float:
    value = raw.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0.0 <= value <= 1.0):
        raise InputError(f"tree config: '{key}' must be a number in [0, 1], got {value!r}")
    return float(value)


def parse_tree_config(raw: Any) -> TreeConfig:
    """Validate a tree config dict; every problem is an InputError naming the field."""
    if raw is None or raw == "none":
        return TreeConfig()
    if not isinstance(raw, dict):
        raise InputError(f"tree config must be a mapping, got {type(raw).__name__}")
    policy = raw.get("policy")
    if not isinstance(policy, str) or policy not in POLICIES:
        raise InputError(f"tree config: unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    unknown = set(raw) - ALL_FIELDS
    if unknown:
        raise InputError(f"tree config: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    cfg = TreeConfig(policy=policy)
    cfg.budget = _positive_int(raw, "budget", 64)
    sample = raw.get("sample_children", False)
    if not isinstance(sample, bool):
        raise InputError(f"tree config: 'sample_children' must be true or false, got {sample!r}")
    cfg.sample_children = sample
    natural_depth = DEFAULT_MAX_DEPTH
    if policy == "widths":
        widths = raw.get("widths")
        if not isinstance(widths, list) or not widths:
            raise InputError("tree config: 'widths' must be a non-empty list of positive integers")
        cfg.widths = [_positive_int({"widths": w}, "widths") for w in widths]
        cfg.budget = _positive_int(raw, "budget", sum(cfg.widths))
        natural_depth = len(cfg.widths)
    elif policy == "depth_branching":
        cfg.depth = _positive_int(raw, "depth")
        cfg.branching = _positive_int(raw, "branching")
        if cfg.branching ** cfg.depth > 1 << 20:
            raise InputError(f"tree config: a full tree of depth {cfg.depth} and branching "
                             f"{cfg.branching} is far too large")
        cfg.budget = _positive_int(raw, "budget", sum(cfg.branching ** d for d in range(1, cfg.depth + 1)))
        natural_depth = cfg.depth
    elif policy == "choices":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise InputError("tree config: 'choices' must be a non-empty list of index paths")
        seen = set()
        for path in choices:
            if (not isinstance(path, list) or not path
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in path)):
                raise InputError(f"tree config: choice {path!r} must be a non-empty list of indices >= 0")
            seen.add(tuple(path))
        for path in seen:
            if len(path) > 1 and path[:-1] not in seen:
                raise InputError(f"tree config: choice {list(path)} has no parent {list(path[:-1])}")
        cfg.choices = sorted((list(p) for p in seen), key=lambda p: (len(p), p))
        cfg.budget = _positive_int(raw, "budget", len(cfg.choices))
        natural_depth = max(len(p) for p in cfg.choices)
    elif policy in ("opt", "auto"):
        delta = raw.get("delta", 0.0)
        if (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta)
                or delta < 0):
            raise InputError(f"tree config: 'delta' must be a number >= 0, got {delta!r}")
        cfg.delta = float(delta)
    elif policy == "adaptive":
        cfg.max_width = _positive_int(raw, "max_width", 8)
        cfg.min_width = _positive_int(raw, "min_width", 1)
        if cfg.min_width > cfg.max_width:
            raise InputError(f"tree config: 'min_width' ({cfg.min_width}) is over 'max_width' ({cfg.max_width})")
        cfg.confident = _probability(raw, "confident", 0.8)
        cfg.unsure = _probability(raw, "unsure", 0.3)
        if cfg.unsure >= cfg.confident:
            raise InputError(f"tree config: 'unsure' ({cfg.unsure}) must be below 'confident' ({cfg.confident})")
        cfg.min_path_prob = _probability(raw, "min_path_prob", 0.05)
    cfg.max_depth = _positive_int(raw, "max_depth", natural_depth)
    return cfg

"""Where a tree config comes from: a preset under configs/trees/, a YAML/JSON file, or inline JSON.

Reading is bounded by construction (issue 14): a 444-byte YAML file of nested aliases once made
the CLI use 6.4 GB and print 2 GB of error. Now a config file or inline text is at most
MAX_CONFIG_BYTES, YAML aliases are refused outright (tree configs never need them), and JSON or
YAML nested deeper than MAX_NESTING levels is refused before any recursive parser sees it.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from treespec.errors import InputError
from treespec.runtime.trees.config import TreeConfig, parse_tree_config, show_text, show_value

MAX_CONFIG_BYTES = 64 * 1024
MAX_NESTING = 32  # a tree config needs 3 (config -> choices -> path)


class _Refused(yaml.YAMLError):
    """Valid YAML that tree configs do not allow (aliases, deep nesting)."""


class _BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and nesting deeper than MAX_NESTING."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        line = self.peek_event().start_mark.line + 1
        if self.check_event(yaml.AliasEvent):
            raise _Refused(f"YAML aliases (*name) are not allowed in tree configs (line {line})")
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise _Refused(f"YAML nested deeper than {MAX_NESTING} levels (line {line})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def preset_names() -> list[str]:
    folder = resources.files("treespec.configs") / "trees"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(text: str, where: str) -> Any:
    """YAML (or JSON) text to Python values, within the size and nesting bounds."""
    _check_size(len(text.encode("utf-8", "surrogatepass")), where)
    try:
        return yaml.load(text, Loader=_BoundedSafeLoader)
    except _Refused as exc:
        raise InputError(f"{where}: {exc}") from None
    except ValueError as exc:  # an integer over Python's 4300-digit limit
        raise InputError(f"{where}: {show_text(str(exc))}") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{where}: malformed YAML: {show_text(first)}") from None


def read_json(text: str, where: str) -> Any:
    """JSON text to Python values, within the size and nesting bounds."""
    _check_size(len(text.encode("utf-8", "surrogatepass")), where)
    if json_nesting(text) > MAX_NESTING:
        raise InputError(f"{where}: JSON nested deeper than {MAX_NESTING} levels")
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer over Python's 4300-digit limit
        raise InputError(f"{where}: invalid JSON: {show_text(str(exc))}") from None


def json_nesting(text: str) -> int:
    """The deepest [ / { nesting in JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _check_size(size: int, where: str) -> None:
    if size > MAX_CONFIG_BYTES:
        raise InputError(f"{where}: {size} bytes is over the {MAX_CONFIG_BYTES // 1024} KB limit for tree configs")


def read_config_file(path: Path) -> Any:
    """A YAML/JSON tree config file, refused before reading if it is too large or not a file."""
    if not _exists(path):
        raise InputError(f"tree config file {show_text(str(path))} does not exist")
    if not path.is_file():
        raise InputError(f"tree config {show_text(str(path))} is not a regular file")
    try:
        with path.open("rb") as handle:
            blob = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read tree config file {show_text(str(path))}: {exc.strerror}") from None
    _check_size(len(blob), show_text(str(path)))
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"tree config file {show_text(str(path))} is not UTF-8 text") from None
    return read_yaml(text, show_text(str(path)))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long for the file system
        return False


def load_tree_preset(name_or_path: str) -> Any:
    """The raw tree config dict from a preset name or a file path (validated later)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or _exists(path):
        return read_config_file(path)
    names = preset_names()
    if name_or_path not in names:
        raise InputError(f"unknown tree {show_value(name_or_path)}: use none, a file path, inline JSON, "
                         f"or a preset ({', '.join(names)})")
    preset = resources.files("treespec.configs") / "trees" / f"{name_or_path}.yaml"
    return read_yaml(preset.read_text(), f"preset {name_or_path}")


def load_tree_spec(spec: Any) -> Any:
    """The raw tree config from what a user gives: None/'none', a dict, inline JSON text, a preset
    name or a file path. Only reads and bounds the input; parse_tree_config validates it."""
    if not isinstance(spec, str) or spec == "none":
        return spec
    _check_size(len(spec), "tree")
    text = spec.strip()
    if text.startswith("{"):
        return read_json(text, "tree")
    return load_tree_preset(text)


def read_tree_config(spec: Any) -> TreeConfig:
    """A validated TreeConfig from anything load_tree_spec accepts (or a TreeConfig)."""
    if isinstance(spec, TreeConfig):
        return spec
    return parse_tree_config(load_tree_spec(spec))

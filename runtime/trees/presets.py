"""Tree presets shipped under configs/trees/, or a YAML/JSON file given by path."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from treespec.errors import InputError


def preset_names() -> list[str]:
    folder = resources.files("treespec.configs") / "trees"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{where}: malformed YAML: {str(exc).splitlines()[0]}") from None


def load_tree_preset(name_or_path: str) -> Any:
    """The raw tree config dict from a preset name or a file path (validated later)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise InputError(f"tree config file {path} does not exist")
        return _read_yaml(path.read_text(), str(path))
    preset = resources.files("treespec.configs") / "trees" / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise InputError(f"unknown tree '{name_or_path}': use none, a file path, inline JSON, "
                         f"or a preset ({', '.join(preset_names())})")
    return _read_yaml(preset.read_text(), f"preset {name_or_path}")

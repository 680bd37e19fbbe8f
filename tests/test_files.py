"""treespec.files: atomic writes leave no temporaries; JSON objects are read or refused in one line."""
from __future__ import annotations

import pytest

from treespec.errors import ArtifactError
from treespec.files import read_json_object, write_atomic, write_json


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    write_atomic(path, "new")
    write_atomic(tmp_path / "engine", memoryview(b"\x00\x01"))
    assert path.read_text() == "new" and (tmp_path / "engine").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "manifest.json"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_atomic(path, 42)  # type: ignore[arg-type]  (neither text nor bytes: the write fails)
    assert read_json_object(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


@pytest.mark.parametrize("text,pattern", [("{oops", r"x.json is corrupt \(not valid JSON"),
                                          ("[1, 2]", r"x.json is corrupt \(not a JSON object\)"),
                                          ("\udcff", r"x.json is corrupt")])
def test_read_json_object_refuses_in_one_line(tmp_path, text, pattern):
    path = tmp_path / "x.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ArtifactError, match=pattern) as err:
        read_json_object(path, "x.json")
    assert "\n" not in str(err.value)

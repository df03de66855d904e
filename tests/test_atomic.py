"""Atomic writes: the target holds the old or the new content, never a partial one, and no temp file is left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persrec import atomic


def test_replaces_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "rows.json"
    target.write_text("old")
    atomic.atomic_write_json(target, [{"a": 1}])
    assert json.loads(target.read_text()) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "table.md"
    target.write_text("old table")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_text(target, "new table")
    assert target.read_text() == "old table"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]

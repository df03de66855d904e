"""Whole-file writes that a reader (or a killed process) never sees half done: temp file, then rename."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a sibling temp path to write `path` through; on success it replaces `path` (`os.replace`, atomic on
    one filesystem), on an exception it is removed and `path` keeps its old content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, value: Any, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(value, indent=indent) + "\n")

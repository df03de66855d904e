"""Whole-file writes that a reader (or a killed process) never sees half done: temp file, then rename."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a sibling temp file and `os.replace` (atomic on one filesystem)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, value: Any, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(value, indent=indent) + "\n")

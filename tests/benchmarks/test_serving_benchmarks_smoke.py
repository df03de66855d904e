"""The serving benchmarks end to end on tiny models: every row present, no request failed.

No timing thresholds: times on a shared machine say nothing about correctness.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_serving_http_quick_run(tmp_path):
    out = tmp_path / "rows.json"
    command = [
        sys.executable,
        "benchmarks/serving_http.py",
        "--quick",
        "--requests",
        "16",
        "--json",
        str(out),
    ]
    printed = subprocess.run(
        command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300
    ).stdout
    rows = json.loads(out.read_text())
    phases = {(row["model"], row["phase"]) for row in rows}
    for model in ("expert", "full"):
        for phase in ("first request (miss)", "1 client(s)", "8 client(s)", "32 client(s)"):
            assert (model, phase) in phases
    assert all(row["errors"] == 0 and row["requests"] > 0 for row in rows)
    assert "HTTP overhead" in printed and "| expert | 32 client(s) |" in printed


@pytest.mark.slow
def test_serving_store_quick_run():
    command = [sys.executable, "benchmarks/serving_store.py", "--quick"]
    printed = subprocess.run(
        command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300
    ).stdout
    assert "| SQLite (WAL) | float16 |" in printed and "| one file per user | float32 |" in printed
    assert "| bfloat16 |" in printed

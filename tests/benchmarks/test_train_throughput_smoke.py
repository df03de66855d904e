"""The training-throughput benchmark's core on tiny models: every field present, FLOPs match a hand count.

No timing thresholds: times on a shared machine say nothing about correctness.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from benchmarks import train_throughput as bench

FIELDS = {
    "model",
    "seq_len",
    "batch",
    "seq_per_s",
    "step_ms",
    "cpu_ms",
    "peak_mem_mb",
    "gflop_per_s",
    "pct_of_peak",
    "peak_gflop_per_s",
    "attention",
    "threads",
    "cpu_share",
    "load_1m_start",
    "load_1m_end",
}


@pytest.fixture(autouse=True)
def _small_peak(monkeypatch):
    monkeypatch.setattr(bench, "PEAK_SIZE", 256)  # the rate is reported, not checked: keep the test fast


def _tiny(spec: bench.RowSpec) -> bench.RowSpec:
    return replace(spec, layers=1, dim=16, heads=2, items=50, negatives=8)


@pytest.mark.parametrize("model", ["HSTU", "SASRec"])
def test_rows_have_every_field(model):
    spec = _tiny(bench.plain_row(model, 12, batch=2))
    rows = bench.run_row(spec, bench.torch.device("cpu"), repeats=2, budget_s=0.01, reference_gb=1.0)
    expected = ["auto", "tiled", "reference"] if model == "HSTU" else ["sdpa"]
    assert [row["attention"] for row in rows] == expected
    for row in rows:
        assert not FIELDS - row.keys(), FIELDS - row.keys()
        assert (row["seq_len"], row["batch"], row["runs"]) == (12, 2, 2)
        assert row["seq_per_s"] > 0 and row["peak_mem_mb"] > 0 and row["gflop_per_s"] > 0
        json.dumps(row)  # --json must be able to write it
    if model == "HSTU":
        assert all("speedup_vs_reference" in row for row in rows)
    assert bench.markdown(rows).count("\n") == len(rows) + 1


def test_authors_row_reports_the_release_ratio_and_skips_a_reference_that_does_not_fit():
    spec = _tiny(replace(bench.AUTHORS, seq_len=20, history=16, experts=2, batch=2))
    rows = bench.run_row(spec, bench.torch.device("cpu"), repeats=2, budget_s=0.01, reference_gb=0.0)
    assert [row["attention"] for row in rows] == ["auto", "tiled"]
    assert all(row["vs_authors_release"] == row["seq_per_s"] / 1.6 for row in rows)
    assert all(row["slots"] == 22 and row["experts"] == 2 for row in rows)


def test_flops_match_a_hand_count():
    spec = _tiny(replace(bench.AUTHORS, seq_len=20, history=16, experts=2, batch=3))
    model = bench.build_trainee(spec, bench.torch.device("cpu")).model
    # 16 history items causal (136 pairs), 2 experts see their segment and each other (17 + 18), 4 recent items
    # see the 2 experts and the causal recent window (4 * 2 + 10).
    pairs = bench.allowed_pairs(spec)
    assert pairs == 136 + 17 + 18 + 4 * 2 + 10
    flops = bench.step_flops(model, spec, pairs)
    linear = 2 * 16 * (2 * (2 * 8 + 2 * 8)) + 2 * 16 * 16  # uvqk + output, per token
    assert flops["linear"] == 3 * 3 * 22 * linear
    assert flops["attention"] == 3 * 3 * pairs * 2 * (16 + 16)
    assert flops["loss"] == 3 * 3 * 20 * (1 + 8) * 2 * 16
    assert bench.allowed_pairs(bench.plain_row("SASRec", 10)) == 55


def test_quick_keeps_the_authors_row():
    args = bench.parse_args(["--quick"])
    specs = bench.row_specs(args)
    assert specs[0].label == "authors"
    assert (specs[0].model, specs[0].seq_len, specs[0].experts, specs[0].batch) == ("HSTU", 500, 4, 8)
    assert (specs[0].layers, specs[0].dim, specs[0].heads, specs[0].negatives) == (16, 64, 8, 512)


def test_command_line_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = ["--models", "SASRec", "--lengths", "10", "--batch", "2", "--layers", "1", "--dim", "16"]
    args += ["--heads", "2", "--negatives", "8", "--no-authors", "--repeats", "2", "--budget-s", "0.01"]
    assert bench.main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["model"] == "SASRec" and rows[0]["seq_len"] == 10
    assert "| SASRec | 10 | 2 | sdpa |" in capsys.readouterr().out

"""The history-length benchmark's planning, result collection and report writing, without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks.history_length import (  # noqa: E402
    Record,
    Run,
    collect,
    dataset_plans,
    execute,
    markdown_table,
    plan_runs,
    train_args,
    write_report,
)


def _fake_records() -> list[Record]:
    full = Record("synthetic", "full", 400, None, None, 0, 0.20, 0.10, 12, 300.0, 9, 0.11, False, "done")
    persrec = Record("synthetic", "persrec", 400, 320, 80, 4, 0.19, 0.098, 10, 280.0, 7, 0.1, False, "done")
    recent = Record("synthetic", "recent", 80, None, 80, 0, None, None, None, None)
    return [full, persrec, recent]


def test_report_writes_table_and_plot(tmp_path: Path) -> None:
    baselines = {"synthetic": {"recall@10": 0.05, "ndcg@10": 0.025}}
    write_report(
        _fake_records(), tmp_path, "python benchmarks/history_length.py --quick", baselines=baselines
    )
    readme = (tmp_path / "README.md").read_text()
    assert "| persrec | 400 | 320 | 80 | 4 | 0.1900 | 0.0980 | -2.0 % |" in readme
    assert "| recent | 80 | – | 80 | – | not run | not run |" in readme
    assert "| popularity | – | – | – | – | 0.0500 | 0.0250 | -75.0 % |" in readme
    assert "history_length.png" in readme
    png = (tmp_path / "history_length.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_plans_keep_the_full_window_for_experts() -> None:
    for quick in (True, False):
        for plan in dataset_plans(quick).values():
            runs = plan_runs(plan)
            persrec = [r for r in runs if r.variant == "persrec"]
            assert {r.k for r in persrec} == set(plan.experts)
            assert [(r.P + r.R, r.R) for r in persrec] == [(plan.full, plan.recent)] * len(persrec)
            assert sorted(r.history_length for r in runs if r.variant == "full") == sorted(plan.lengths)
            assert len({r.name for r in runs}) == len(runs)


def test_finished_runs_are_skipped_and_collected(tmp_path: Path) -> None:
    plan = dataset_plans(quick=True)["synthetic"]
    run = Run("synthetic", "persrec", 32, 24, 8, 4)
    run_dir = tmp_path / run.name
    run_dir.mkdir()
    metrics = {"recall@10": 0.3, "ndcg@10": 0.2}
    (run_dir / "results.json").write_text(
        json.dumps({"best_epoch": 1, "filter_seen": False, "valid": metrics, "test": metrics})
    )
    (run_dir / "metrics.csv").write_text("step,epoch,loss\n4,0,1.0\n8,1,0.9\n8,,\n")
    assert execute(run, plan, tmp_path, dataset=tmp_path, deadline=0.0)  # no training is started
    record = collect(run, tmp_path)
    assert (record.status, record.epochs, record.best_epoch, record.ndcg_at_10) == ("done", 2, 1, 0.2)
    assert record.to_json()["ndcg@10"] == 0.2
    assert "0.2000" in markdown_table([record])


def test_runs_train_on_the_plans_prepared_dataset(tmp_path: Path) -> None:
    plan = dataset_plans(quick=True)["synthetic"]
    assert plan.synthetic is not None and plan.synthetic.long_term_interests_per_user == 8
    run = Run("synthetic", "persrec", 32, 24, 8, 4)
    args = train_args(run, plan, tmp_path / "runs", tmp_path / "prepared")
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--dataset"] == str(tmp_path / "prepared")
    assert (flags["--model"], flags["--pretrain_item_num"], flags["--recent_item_num"]) == (
        "PersonalizedHSTU",
        "24",
        "8",
    )
    assert flags["--MAX_ITEM_LIST_LENGTH"] == "32"

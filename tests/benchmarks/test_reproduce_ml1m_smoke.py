"""The ML-1M reproduction script's skip/resume decisions, result collection and table, without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import reproduce_ml1m as bench


def _finished_run(run_dir: Path, epochs_done: int = 12) -> None:
    metrics = {
        "recall@10": 0.30,
        "ndcg@10": 0.17,
        "recall@50": 0.56,
        "ndcg@50": 0.23,
        "recall@200": 0.76,
        "ndcg@200": 0.26,
    }
    results = {"best_epoch": 7, "valid": metrics, "test": metrics, "test (popularity baseline)": metrics}
    checkpoint = run_dir / "checkpoints" / "step-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"epoch": epochs_done}))
    (run_dir / "checkpoints" / "latest").write_text("step-10")
    (run_dir / "config.yaml").write_text("epochs: 30\nnegatives_per_position: true\n")
    (run_dir / "results.json").write_text(json.dumps(results))
    bench.add_wall_seconds(run_dir, 120.0)


def _fake_training(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replace `persrec train` by one that records its command and leaves a finished run behind."""
    commands: list[list[str]] = []

    def fake_call(command: list[str], **_: object) -> int:
        commands.append(command)
        _finished_run(
            Path(command[command.index("--checkpoint_dir") + 1]) / command[command.index("--run_name") + 1]
        )
        return 0

    monkeypatch.setattr(bench.subprocess, "call", fake_call)
    return commands


def test_collect_and_table(tmp_path: Path) -> None:
    _finished_run(tmp_path / "hstu")
    row = bench.collect(bench.BENCHMARKS["hstu"], tmp_path / "hstu")
    assert row is not None
    assert row["hr@10"] == 0.30 and row["published hr@10"] == 0.3097
    assert (row["best epoch"], row["epochs trained"], row["max epochs"]) == (7, 12, 30)
    assert row["wall seconds"] == 120.0
    table = bench.markdown([row], "python benchmarks/reproduce_ml1m.py", ["a note"])
    assert "| hstu (ours) | 0.3000 (-3.1%) |" in table
    assert "| hstu (paper) | 0.3097 | 0.1720 |" in table
    assert "7 / 12 / 30 | 2 min |" in table
    assert "- a note" in table


def test_finished_runs_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _finished_run(tmp_path / "runs" / "sasrec")
    calls: list[list[str]] = []
    monkeypatch.setattr(bench.subprocess, "call", lambda command, **_: calls.append(command) or 0)
    args, extra = bench.parse_args(["--output", str(tmp_path), "--models", "sasrec"])
    bench.train(bench.BENCHMARKS["sasrec"], "sasrec", tmp_path / "runs", tmp_path / "logs", args, extra)
    assert calls == []


def test_unfinished_runs_resume_with_thread_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "runs" / "hstu"
    _finished_run(run_dir)
    (run_dir / "results.json").unlink()
    seen: dict[str, object] = {}

    def fake_call(command: list[str], env: dict[str, str], **_: object) -> int:
        seen.update(command=command, threads=env["OMP_NUM_THREADS"])
        return 0

    monkeypatch.setattr(bench.subprocess, "call", fake_call)
    args, extra = bench.parse_args(["--output", str(tmp_path), "--threads", "2", "--", "--seed", "3"])
    bench.train(bench.BENCHMARKS["hstu"], "hstu", tmp_path / "runs", tmp_path / "logs", args, extra)
    command = seen["command"]
    assert isinstance(command, list) and command[-2:] == ["--resume", "true"]
    assert "--seed" in command and seen["threads"] == "2"
    assert bench.recorded_wall_seconds(run_dir) is not None


def test_their_protocol_trains_without_validation_split_in_its_own_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = _fake_training(monkeypatch)
    argv = [
        "--output",
        str(tmp_path),
        "--models",
        "sasrec",
        "--protocols",
        "persrec",
        "generative-recommenders",
    ]
    assert bench.main(argv) == 0
    plain, theirs = commands
    assert "--validation_split" not in plain and plain[plain.index("--run_name") + 1] == "sasrec"
    assert theirs[theirs.index("--validation_split") + 1] == "false"
    assert theirs[theirs.index("--run_name") + 1] == "sasrec-gr-protocol"
    table = (tmp_path / "README.md").read_text()
    assert "| sasrec (ours) |" in table and "| sasrec (ours, their protocol) |" in table
    assert table.count("| sasrec (paper) |") == 1 and "selected on the test item" in table


def test_recorded_rows_outlive_their_runs_and_are_not_trained_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = _fake_training(monkeypatch)
    argv = ["--output", str(tmp_path), "--models", "hstu"]
    assert bench.main(argv) == 0
    row = json.loads(bench.row_path(tmp_path, "hstu").read_text())
    assert (row["run"], row["negatives"], row["hr@10"]) == ("hstu", "per position", 0.30)

    # An older row of the same model, kept under another name, joins the table with its label.
    older = dict(
        row,
        run="hstu-negatives-per-sequence",
        negatives="per sequence",
        note="an older run",
        **{"hr@10": 0.25},
    )
    bench.record_row(tmp_path, older)
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            path.unlink()  # the local run is gone; its row remains
    assert bench.main(argv) == 0
    assert len(commands) == 1
    table = (tmp_path / "README.md").read_text()
    assert table.index("| hstu (ours) | 0.3000") < table.index(
        "| hstu (ours, per-sequence negatives) | 0.2500"
    )
    assert (
        "`per-sequence negatives` rows" in table and "- `hstu-negatives-per-sequence`: an older run." in table
    )
    assert "their protocol" not in table


def test_an_interrupted_run_still_records_its_wall_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(command: list[str], **_: object) -> int:
        bench.stop_on_sigterm(15, None)  # raises, as the handler does in the script
        return 0

    monkeypatch.setattr(bench.subprocess, "call", interrupted)
    args, extra = bench.parse_args(["--output", str(tmp_path), "--models", "hstu"])
    with pytest.raises(SystemExit, match="signal 15"):
        bench.train(bench.BENCHMARKS["hstu"], "hstu", tmp_path / "runs", tmp_path / "logs", args, extra)
    assert bench.recorded_wall_seconds(tmp_path / "runs" / "hstu") is not None

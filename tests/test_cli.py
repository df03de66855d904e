"""The command line from raw CSV to a trained, evaluated model."""

import csv

import pyarrow.parquet as pq

from persrec.cli import main
from tests.conftest import tiny_overrides


def test_convert_prepare_train_from_csv(tmp_path, capsys):
    raw = tmp_path / "ratings.csv"
    with raw.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uid", "movie", "ts"])
        for user in range(12):
            for step in range(8):
                writer.writerow([f"u{user}", (user * 3 + step * 5) % 17, 1000 + step])
    assert main(["convert", str(raw), str(tmp_path / "ratings.parquet")]) == 0
    assert pq.read_table(tmp_path / "ratings.parquet").num_rows == 96
    prepare = [
        "prepare",
        "--input",
        str(tmp_path / "ratings.parquet"),
        "--output",
        str(tmp_path / "prepared"),
    ]
    prepare += ["--user_col", "uid", "--item_col", "movie", "--time_col", "ts"]
    assert main(prepare) == 0
    overrides = tiny_overrides(
        tmp_path / "prepared", tmp_path / "runs", epochs=1, popularity_baseline="false"
    )
    flags = [
        item
        for key, value in overrides.items()
        for item in (f"--{key}", str(value).strip("[]").replace(" ", ""))
    ]
    capsys.readouterr()
    assert main(["train", *flags]) == 0
    out = capsys.readouterr().out
    assert "| test" in out and "filter_seen=False" in out and "checkpoints:" in out
    assert main(["train", *flags, "--resume", "true", "--val_only", "true"]) == 0
    assert "| valid" in capsys.readouterr().out


def test_prepare_reports_a_missing_column(tmp_path, capsys):
    raw = tmp_path / "x.csv"
    raw.write_text("user_id,item,timestamp\n1,2,3\n")
    assert main(["convert", str(raw), str(tmp_path / "x.parquet")]) == 0
    code = main(["prepare", "--input", str(tmp_path / "x.parquet"), "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and "x.parquet" in error and "item_id" in error


def test_tensorboard_logger(tiny_dataset, tmp_path):
    overrides = tiny_overrides(
        tiny_dataset, tmp_path, epochs=1, logger="tensorboard", popularity_baseline="false"
    )
    flags = [
        item
        for key, value in overrides.items()
        for item in (f"--{key}", str(value).strip("[]").replace(" ", ""))
    ]
    assert main(["train", *flags]) == 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))

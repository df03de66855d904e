"""The command line from raw CSV to a trained, evaluated model."""

import csv

import pyarrow.parquet as pq
import pytest

from persrec import __version__
from persrec.cli import main
from persrec.config_reference import config_reference
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


def test_usage_version_and_unknown_command(capsys):
    for argv in ([], ["--help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: persrec <command>")
        assert all(
            f"  {command}" in out for command in ("quickstart", "train", "evaluate", "prepare", "convert")
        )
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"persrec {__version__}"
    assert main(["foo"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("persrec: unknown command 'foo'")
    assert "train, evaluate" in captured.err


def test_train_help_lists_every_key_with_type_default_and_doc(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for row in config_reference():
        assert f"  --{row.key}  {row.type}, default: " in out, row.key
    assert "  --optim_args.learning_rate  float, default: 0.001\n      AdamW learning rate" in out
    assert "  --topk  list of int, default: 5,10,50,200\n" in out
    headers = [line for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headers[:5] == [
        "data:",
        "model:",
        "Hugging Face backbones (LLaMAID, HLLM):",
        "personalized experts (PerSRec):",
        "loss:",
    ]
    assert "optimiser (optim_args.*):" in headers and "evaluation:" in headers


def test_quickstart_help_shows_the_quickstart_settings(capsys):
    assert main(["quickstart", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: persrec quickstart")
    assert "  --valid_metric  str, default: recall@50\n" in out  # from quickstart.yaml, not Config()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("evaluate", ["checkpoint", "--filter_seen  bool, default: false", "--topk"]),
        ("prepare", ["--input", "--user_col USER_COL   (default: user_id)", "(default: 3GB)"]),
        ("convert", ["input", "output", "--encoding ENCODING", "(default: utf-8)"]),
    ],
)
def test_argparse_commands_list_options_with_defaults(command, expected, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: persrec {command}")
    for text in expected:
        assert text in out, text

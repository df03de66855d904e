"""The gradient-checkpointing benchmark on a tiny model: less memory kept, gradients exactly equal."""

from __future__ import annotations

from benchmarks import gradient_checkpointing as bench


def test_rows_show_less_saved_memory_and_equal_gradients(capsys):
    rows = bench.main(
        ["--layers", "3", "--dim", "16", "--length", "24", "--batch", "2", "--items", "30", "--repeats", "1"]
    )
    assert [row["backbone"] for row in rows] == ["SASRec", "HSTU"]
    for row in rows:
        assert row["checkpointed_mib"] < row["saved_mib"]
        assert row["max_abs_grad_diff"] == 0.0
    assert "| SASRec |" in capsys.readouterr().out

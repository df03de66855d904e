"""persrec stats: hand-computed counts, quantiles, repeat rate and text coverage; the histogram PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persrec.cli import main
from persrec.config import ConfigError
from persrec.data.prepare import prepare_dataset
from persrec.data.stats import dataset_stats, plot_history_histogram, repeat_count
from persrec.data.store import PreparedDataset


@pytest.fixture
def small(tmp_path: Path) -> Path:
    # user 1: a b a c a (2 repeats), user 2: b b (1 repeat), user 3: c (none) -> 3 / 8 repeats.
    rows = [(1, "a", 10), (1, "b", 20), (1, "a", 30), (1, "c", 40), (1, "a", 50), (2, "b", 15), (2, "b", 16)]
    rows.append((3, "c", 86_410))
    table = pa.table(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": pa.array([r[2] for r in rows], pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "i.parquet")
    items = pa.table(
        {
            "item_id": ["a", "b", "c"],
            "title": ["Alpha", "  ", None],
            "tags": pa.array([["x"], [], ["y", "z"]], pa.list_(pa.string())),
            "price": [1.0, 2.0, 3.0],
        }
    )
    pq.write_table(items, tmp_path / "items.parquet")
    prepare_dataset(tmp_path / "i.parquet", tmp_path / "p", items=tmp_path / "items.parquet", progress=False)
    return tmp_path / "p"


def test_hand_computed_stats(small: Path) -> None:
    stats = dataset_stats(PreparedDataset.open(small))
    assert (stats.users, stats.items, stats.interactions) == (3, 3, 8)
    assert (stats.history_min, stats.history_max) == (1, 5)
    assert stats.history_quantiles["p50"] == 2.0
    assert stats.history_quantiles["p90"] == pytest.approx(np.quantile([5, 2, 1], 0.9))
    assert (stats.first_time, stats.last_time) == (10, 86_410)
    assert stats.repeat_rate == pytest.approx(3 / 8)
    assert stats.text_coverage == {"title": pytest.approx(1 / 3), "tags": pytest.approx(2 / 3)}


def test_repeat_count_in_chunks(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import persrec.data.stats as stats_module

    dataset = PreparedDataset.open(small)
    monkeypatch.setattr(stats_module, "_CHUNK", 2)  # one user per chunk, or a user larger than a chunk
    assert repeat_count(dataset) == 3


def test_cli_prints_and_plots(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "h.png"
    assert main(["stats", str(small), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "users: 3" in out and "repeat rate: 37.50%" in out and "title 33.3%, tags 66.7%" in out
    assert "1970-01-01 00:00:10 UTC to 1970-01-02 00:00:10 UTC (1.0 days)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["stats", str(small), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["interactions"] == 8


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"plot extra: pip install 'persrec\[plot\]'"):
        plot_history_histogram(np.array([1, 2, 3]), tmp_path / "h.png")
    assert not (tmp_path / "h.png").exists()

"""EB-NeRD builder: list columns unnested in order, behaviors clicks, article text, filter, real fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persrec.cli import main
from persrec.config import ConfigError
from persrec.data.datasets.ebnerd import EbnerdOptions, build_ebnerd
from persrec.data.datasets.registry import resolve_dataset, shared_data_dir
from persrec.data.schema import DataValidationError
from persrec.data.store import PreparedDataset
from tests.data.builder_files import epoch, write_ebnerd


def test_history_rows_in_list_order(tmp_path: Path) -> None:
    root = write_ebnerd(tmp_path / "ebnerd_small")
    built = build_ebnerd(root, tmp_path / "out")
    rows = pq.read_table(built.interactions).to_pylist()
    assert rows == [
        {"user_id": 7, "item_id": 101, "timestamp": epoch(1, 5)},
        {"user_id": 7, "item_id": 102, "timestamp": epoch(1, 9)},
        {"user_id": 7, "item_id": 101, "timestamp": epoch(2)},
        {"user_id": 3, "item_id": 103, "timestamp": epoch(3)},
    ]
    assert built.min_user_interactions == 0


def test_engagement_and_behaviors(tmp_path: Path) -> None:
    root = write_ebnerd(tmp_path / "r")
    built = build_ebnerd(root, tmp_path / "out", EbnerdOptions(behaviors=True, keep_engagement=True))
    table = pq.read_table(built.interactions)
    assert table.column_names == ["user_id", "item_id", "timestamp", "scroll_percentage", "read_time"]
    rows = table.to_pylist()
    assert [r["scroll_percentage"] for r in rows[:4]] == [10.0, None, 90.0, 50.0]
    assert [r["read_time"] for r in rows[:4]] == [3.0, 4.0, 5.0, 6.0]
    clicks = sorted((r["user_id"], r["item_id"], r["timestamp"]) for r in rows[4:])
    assert clicks == [(3, 105, epoch(5)), (7, 101, epoch(6)), (7, 106, epoch(6))]


def test_article_table_text_columns(tmp_path: Path) -> None:
    built = build_ebnerd(write_ebnerd(tmp_path / "r"), tmp_path / "out")
    items = pq.read_table(built.items)
    assert items.column_names == [
        "item_id",
        "title",
        "subtitle",
        "body",
        "category_str",
        "topics",
        "published_time",
    ]
    assert items.schema.field("topics").type == pa.string()
    assert items["topics"].to_pylist() == ["Sport, Fodbold", None, None, "Krimi"]
    assert items["subtitle"].to_pylist() == ["sub", None, None, "four"]
    assert items["title"].to_pylist()[0] == "Første nyhed"


def test_prepare_format_cli_with_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSREC_CACHE_DIR", str(tmp_path / "cache"))
    root = write_ebnerd(tmp_path / "r")
    out = tmp_path / "prepared"
    argv = ["prepare", "--format", "ebnerd", "--input", str(root), "--output", str(out), "--min_clicks", "2"]
    assert main(argv) == 0
    dataset = PreparedDataset.open(out)
    assert (dataset.num_users, dataset.num_items, dataset.num_interactions) == (1, 2, 3)
    assert dataset.manifest["filters"]["min_user_interactions"] == 2
    table = dataset.item_table()
    assert table is not None and table["title"].to_pylist() == ["Første nyhed", "Second"]
    # A second run of the same files reuses the cached build and the prepared dataset.
    sources = sorted((tmp_path / "cache" / "sources").iterdir())
    assert main(argv) == 0
    assert sorted((tmp_path / "cache" / "sources").iterdir()) == sources


def test_named_datasets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--dataset ebnerd needs --data_path"):
        resolve_dataset("ebnerd", cache_dir=tmp_path)
    dataset = resolve_dataset(
        "ebnerd", data_path=write_ebnerd(tmp_path / "r"), cache_dir=tmp_path / "c", progress=False
    )
    assert (dataset.num_users, dataset.num_items, dataset.num_interactions) == (2, 3, 4)
    assert dataset.path == tmp_path / "c" / "ebnerd"
    # eb_nerd_512: only the user with at least 512 clicks stays.
    heavy = tmp_path / "heavy"
    heavy.mkdir()
    times = pa.large_list(pa.timestamp("s"))
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([1, 2], pa.uint32()),
                "article_id_fixed": pa.array([list(range(512)), [1, 2, 3]], pa.large_list(pa.int32())),
                "impression_time_fixed": pa.array([[epoch(1)] * 512, [epoch(2)] * 3], times),
            }
        ),
        heavy / "history.parquet",
    )
    paper = resolve_dataset("eb_nerd_512", data_path=heavy, cache_dir=tmp_path / "c", progress=False)
    assert (paper.num_users, paper.num_interactions) == (1, 512)
    assert paper.user_id_map()["user_id"].to_pylist() == [1]


def test_bad_history(tmp_path: Path) -> None:
    bad = tmp_path / "history.parquet"
    pq.write_table(pa.table({"user_id": [1], "article_ids": [[1]]}), bad)
    with pytest.raises(DataValidationError, match="missing column.*article_id_fixed, impression_time_fixed"):
        build_ebnerd(bad, tmp_path / "out")
    uneven = tmp_path / "u" / "history.parquet"
    uneven.parent.mkdir()
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([5], pa.uint32()),
                "article_id_fixed": pa.array([[1, 2]], pa.list_(pa.int32())),
                "impression_time_fixed": pa.array([[epoch(1)]], pa.list_(pa.int64())),
            }
        ),
        uneven,
    )
    with pytest.raises(DataValidationError, match="user 5 has list columns of different lengths"):
        build_ebnerd(uneven.parent, tmp_path / "out2")


def _fixture() -> Path:
    root = shared_data_dir()
    if root is None or not (root / "ebnerd-sample" / "history.parquet").is_file():
        pytest.skip("shared EB-NeRD fixture not available (set PERSREC_SHARED_DATA)")
    return root / "ebnerd-sample"


@pytest.mark.shared_data
def test_official_fixture_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = _fixture()
    built = build_ebnerd(sample, tmp_path / "out", EbnerdOptions(keep_engagement=True))
    assert built.items is None  # the fixture ships no articles.parquet
    table = pq.read_table(built.interactions)
    expected = sum(len(x) for x in pq.read_table(sample / "history.parquet")["article_id_fixed"].to_pylist())
    assert table.num_rows == expected == 8303
    assert len(set(table["user_id"].to_pylist())) == 44
    assert len(set(table["item_id"].to_pylist())) == 2194
    monkeypatch.setenv("PERSREC_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["stats", str(_prepared(sample, tmp_path)), "--json"]) == 0


def _prepared(sample: Path, tmp_path: Path) -> Path:
    out = tmp_path / "prepared"
    assert main(["prepare", "--format", "ebnerd", "--input", str(sample), "--output", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (44, 2194, 8303)
    return out

"""MerRec builder: object id choice, event filter, latest item attributes, category fallback, user filter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persrec.cli import main
from persrec.config import ConfigError
from persrec.data.datasets.merrec import MerrecOptions, build_merrec
from persrec.data.schema import DataValidationError
from persrec.data.store import PreparedDataset
from tests.data.builder_files import epoch, write_merrec


def test_product_ids_events_and_times(tmp_path: Path) -> None:
    write_merrec(tmp_path / "raw" / "202305" / "part-0.parquet")
    built = build_merrec(tmp_path / "raw", tmp_path / "out")
    rows = pq.read_table(built.interactions).to_pylist()
    assert [(r["user_id"], r["item_id"], r["timestamp"], r["event"]) for r in rows] == [
        (1, "p1", epoch(1, 1), "item_view"),
        (1, "p2", epoch(1, 2), "buy_comp"),
        (2, "p1", epoch(1, 3), "item_like"),
        (2, "p3", epoch(1, 4), "item_view"),
        (1, "p1", epoch(1, 5), "item_view"),
        (2, "p2", epoch(1, 6), "offer_make"),
    ]
    assert [r["sequence_id"] for r in rows] == [10, 10, 20, 20, 11, 20]


def test_item_table_latest_values_and_category(tmp_path: Path) -> None:
    built = build_merrec(write_merrec(tmp_path / "a.parquet"), tmp_path / "out")
    items = {r["item_id"]: r for r in pq.read_table(built.items).to_pylist()}
    assert list(items) == ["p1", "p2", "p3"]
    # p1: the latest non-blank name (t=5), the latest brand (t=3), c2 from t=3 as the most specific category.
    assert items["p1"]["name"] == "new name" and items["p1"]["brand_name"] == "acme"
    assert items["p1"]["category"] == "T-shirts"
    # p2: a blank name at t=6 does not hide "shoe"; c1 "Shoes" (t=6) is the most specific level it has.
    assert items["p2"]["name"] == "shoe" and items["p2"]["category"] == "Shoes"
    assert items["p3"]["name"] is None and items["p3"]["category"] == "Kids"
    assert pq.read_schema(built.items).field("category").type == pa.string()


def test_listing_ids_event_filter_and_epoch_stime(tmp_path: Path) -> None:
    path = write_merrec(tmp_path / "a.parquet", stime_type="epoch")
    options = MerrecOptions(object_id="item_id", events="item_view,buy_comp", items=False)
    built = build_merrec(path, tmp_path / "out", options)
    assert built.items is None
    rows = pq.read_table(built.interactions).to_pylist()
    assert [(r["item_id"], r["timestamp"]) for r in rows] == [
        ("m1", epoch(1, 1)),
        ("m2", epoch(1, 2)),
        ("m4", epoch(1, 4)),
        ("m5", epoch(1, 5)),
    ]


def test_min_seq_len_through_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSREC_CACHE_DIR", str(tmp_path / "cache"))
    path = write_merrec(tmp_path / "a.parquet")
    out = tmp_path / "p"
    argv = ["prepare", "--format", "merrec", "--input", str(path), "--output", str(out)]
    assert main([*argv, "--min_seq_len", "3", "--events", "item_view,buy_comp,item_like"]) == 0
    dataset = PreparedDataset.open(out)
    assert dataset.user_id_map()["user_id"].to_pylist() == [1]  # user 2 has 2 such events
    assert dataset.num_interactions == 3
    assert main([*argv, "--min_seq_len", "3", "--overwrite"]) == 0
    dataset = PreparedDataset.open(out)
    assert (dataset.num_users, dataset.num_interactions) == (2, 6)
    table = dataset.item_table()
    assert table is not None and table["category"].to_pylist() == ["T-shirts", "Shoes", "Kids"]


def test_bad_merrec_inputs(tmp_path: Path) -> None:
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"user_id": [1], "item_id": ["x"], "timestamp": [1]}), other)
    with pytest.raises(DataValidationError, match=r"missing column\(s\) product_id, event_id, stime"):
        build_merrec(other, tmp_path / "out")
    with pytest.raises(ConfigError, match="--events: unknown MerRec event type"):
        MerrecOptions(events="item_view,click")
    with pytest.raises(ConfigError, match="--object_id 'sku'"):
        MerrecOptions(object_id="sku")


def test_events_keep_file_order_across_row_groups(tmp_path: Path) -> None:
    """Equal timestamps are ordered by input position in prepare, so the builder must not reorder rows."""
    rows = 120_000
    rng = np.random.default_rng(1)
    source = tmp_path / "big.parquet"
    table = pa.table(
        {
            "user_id": rng.integers(0, 500, rows),
            "product_id": pa.array([f"p{i}" for i in rng.integers(0, 5000, rows)]),
            "event_id": pa.array(["item_view"] * rows),
            "stime": pa.array(np.full(rows, 1_700_000_000), pa.int64()),
        }
    )
    pq.write_table(table, source, row_group_size=7_000)
    built = build_merrec(source, tmp_path / "out", MerrecOptions(items=False))
    out = pq.read_table(built.interactions)
    assert out["user_id"].to_pylist() == table["user_id"].to_pylist()
    assert out["item_id"].to_pylist() == table["product_id"].to_pylist()

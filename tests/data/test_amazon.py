"""Amazon reviews builder: header-less rating files of 2014 and 2018, literal-dict and JSON meta, 5-core modes."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from persrec.cli import main
from persrec.config import ConfigError
from persrec.data.datasets.amazon import AmazonOptions, build_amazon
from persrec.data.datasets.amazon_meta import parse_line
from persrec.data.datasets.registry import shared_data_dir
from persrec.data.schema import DataValidationError
from persrec.data.store import PreparedDataset
from tests.data.builder_files import literal_meta_line, write_amazon_2014, write_amazon_2018


def test_2014_ratings_and_literal_meta(tmp_path: Path) -> None:
    built = build_amazon(write_amazon_2014(tmp_path / "raw"), tmp_path / "out")
    rows = pq.read_table(built.interactions).to_pylist()
    assert rows[0] == {"user_id": "A1", "item_id": "B01", "timestamp": 1356220800, "rating": 5.0}
    assert [r["item_id"] for r in rows] == ["B01", "B02", "B01", "B03"]
    items = {r["item_id"]: r for r in pq.read_table(built.items).to_pylist()}
    assert items["B01"] == {
        "item_id": "B01",
        "title": "Tool Box & Easel",
        "description": 'Learn "fast"',
        "categories": "Toys & Games, Arts",
        "brand": None,
    }
    assert items["B02"]["brand"] == "Melissa & Doug" and items["B02"]["title"] is None
    assert items["B03"]["title"] == 'It\'s "quoted"' and items["B03"]["description"] is None


def test_2018_item_first_and_json_meta(tmp_path: Path) -> None:
    built = build_amazon(write_amazon_2018(tmp_path / "raw"), tmp_path / "out")
    rows = pq.read_table(built.interactions).to_pylist()
    assert [(r["user_id"], r["item_id"]) for r in rows] == [("U9", "0001"), ("U9", "0002"), ("U8", "0001")]
    items = pq.read_table(built.items).to_pylist()
    assert items[0]["title"] == "A & B"
    assert items[0]["description"] == "Para one. Para <two>."
    assert items[0]["categories"] == "Books, Fiction"
    assert items[1]["title"] is None and items[1]["categories"] is None and items[1]["brand"] == "Penguin"


def _core_ratings(root: Path) -> Path:
    """Items a (5 users), b (4 users); users u1..u4 rate a and b, u5 rates a only."""
    root.mkdir()
    lines = [f"u{u},a,5.0,{100 + u}" for u in range(1, 6)] + [f"u{u},b,4.0,{200 + u}" for u in range(1, 5)]
    # each of u1..u4 needs 5 ratings for the user side: add items c..e rated by all four
    lines += [f"u{u},{i},3.0,{300 + u}" for u in range(1, 5) for i in "cde"]
    (root / "ratings_Toys.csv").write_text("\n".join(lines) + "\n")
    return root


def test_five_core_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSREC_CACHE_DIR", str(tmp_path / "cache"))
    raw = _core_ratings(tmp_path / "raw")
    # single pass: only item a has 5 raters; then only users with 5 ratings of a... none has: everything goes
    # except that the item filter runs first: a survives (5), b..e (4 raters) go, every user then has 1 < 5.
    single = build_amazon(raw, tmp_path / "s", AmazonOptions(five_core="single"))
    assert pq.read_metadata(single.interactions).num_rows == 0
    iterative = build_amazon(raw, tmp_path / "i", AmazonOptions(five_core="iterative"))
    assert (iterative.min_user_interactions, iterative.min_item_interactions) == (5, 5)
    out = tmp_path / "prepared"
    assert (
        main(
            [
                "prepare",
                "--format",
                "amazon-reviews",
                "--input",
                str(raw),
                "--output",
                str(out),
                "--min_item_interactions",
                "4",
            ]
        )
        == 0
    )
    dataset = PreparedDataset.open(out)
    # 4-core on items with the 0 user minimum: every item has at least 4 raters.
    assert (dataset.num_users, dataset.num_items, dataset.num_interactions) == (5, 5, 21)


def test_single_pass_keeps_file_order(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [f"u{u},{i},5.0,7" for u in range(1, 6) for i in "zyxwv"]
    (raw / "ratings_Toys.csv").write_text("\n".join(lines) + "\n")
    built = build_amazon(raw, tmp_path / "out", AmazonOptions(five_core="single"))
    rows = pq.read_table(built.interactions).to_pylist()
    assert [(r["user_id"], r["item_id"]) for r in rows] == [
        (f"u{u}", i) for u in range(1, 6) for i in "zyxwv"
    ]


def test_meta_never_executes_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    line = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    with pytest.raises(DataValidationError, match="not a JSON object or a Python literal dict"):
        parse_line(line, "meta:1")
    assert not marker.exists()
    assert parse_line(literal_meta_line({"asin": "x", "flag": True}), "m") == {"asin": "x", "flag": True}


def test_bad_amazon_inputs(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ratings_Toys.csv").write_text("user,item,rating,timestamp\nA,B,5.0,1\n")
    with pytest.raises(DataValidationError, match="is not user,item,rating,timestamp"):
        build_amazon(raw, tmp_path / "out")
    (raw / "ratings_Toys.csv").write_text("A,B,5.0\n")
    with pytest.raises(DataValidationError, match="no header and four columns"):
        build_amazon(raw, tmp_path / "out")
    (raw / "ratings_Toys.csv").write_text("A,B,5.0,1\n")
    with gzip.open(raw / "meta_Toys.json.gz", "wt") as handle:
        handle.write("{'title': 'no asin'}\n")
    with pytest.raises(DataValidationError, match="meta_Toys.json.gz:1: record has no 'asin'"):
        build_amazon(raw, tmp_path / "out")
    (raw / "ratings_Games.csv").write_text("A,B,5.0,1\n")
    with pytest.raises(ConfigError, match="--category: .* holds several rating files"):
        build_amazon(raw, tmp_path / "out")
    with pytest.raises(ConfigError, match="--five_core 'yes'"):
        AmazonOptions(five_core="yes")


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "counts"),
    [("amazon2014-toy", (19124, 11758, 165247)), ("amazon2014-health", (38329, 18427, 343831))],
)
def test_shared_amazon_text(name: str, counts: tuple[int, int, int], tmp_path: Path) -> None:
    root = shared_data_dir()
    if root is None or not (root / "amazon-text" / name / "items.csv.gz").is_file():
        pytest.skip("shared amazon-text not available (set PERSREC_SHARED_DATA)")
    raw = root / "amazon-text" / name
    out = tmp_path / "prepared"
    argv = [
        "prepare",
        "--format",
        "amazon-reviews",
        "--input",
        str(raw),
        "--output",
        str(out),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--five_core",
        "iterative",
    ]
    assert main(argv) == 0
    dataset = PreparedDataset.open(out)
    assert (dataset.num_users, dataset.num_items, dataset.num_interactions) == counts
    titles = dataset.item_table()["title"].to_pylist()
    assert all(titles) and not any("&amp;" in t or "&quot;" in t for t in titles)
    # The same titles, written as a 2014 meta file of Python literals, read back identically.
    import csv

    with gzip.open(raw / "items.csv.gz", "rt", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))[:2000]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    with gzip.open(legacy / "meta_Toys.json.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(literal_meta_line({"asin": r["item_id"], "title": r["title"]}) for r in records)
    (legacy / "ratings_Toys.csv").write_text("".join(f"u,{r['item_id']},5.0,1\n" for r in records))
    built = build_amazon(legacy, tmp_path / "legacy-out")
    legacy_titles = pq.read_table(built.items).sort_by("item_id")
    by_id = dict(zip(dataset.item_table()["item_id"].to_pylist(), titles, strict=True))
    assert legacy_titles["title"].to_pylist() == [by_id[i] for i in legacy_titles["item_id"].to_pylist()]
    assert len(legacy_titles) == len(records)

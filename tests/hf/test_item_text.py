"""Item texts: `key: value` fields in item-index order, from the item table or --text_path; missing text refused."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persrec.config import ConfigError
from persrec.data.prepare import prepare_dataset
from persrec.hf.item_text import (
    DEFAULT_ITEM_PROMPT,
    ItemTextOptions,
    ItemTexts,
    format_value,
    item_text,
    load_item_texts,
)


def _interactions(path: Path, item_ids: list) -> Path:
    users = [1 + i % 3 for i in range(len(item_ids) * 2)]
    items = [item_ids[i % len(item_ids)] for i in range(len(users))]
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": list(range(len(users)))}), path)
    return path


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """Items 30, 10, 20 (so item_idx order differs from the file's order) with list, float and null fields."""
    items = pa.table(
        {
            "item_id": [20, 10, 30],
            "title": ["Wooden puzzle", None, "Red car"],
            "genres": [["toy", "game"], ["doll"], []],
            "price": [math.nan, 3.5, 2.0],
        }
    )
    pq.write_table(items, tmp_path / "items.parquet")
    interactions = _interactions(tmp_path / "inter.parquet", [30, 10, 20])
    return prepare_dataset(
        interactions, tmp_path / "prepared", items=tmp_path / "items.parquet", progress=False
    ).path


def _expected_by_id() -> dict[int, str]:
    return {
        20: "title: Wooden puzzle genres: toy, game",
        10: "genres: doll price: 3.5",
        30: "title: Red car price: 2.0",
    }


def _ids(path: Path) -> list[int]:
    return pq.read_table(path / "item_ids.parquet").sort_by("item_idx").column("item_id").to_pylist()


def test_values_are_formatted_and_empty_fields_skipped() -> None:
    assert format_value(None) is None and format_value(math.nan) is None and format_value("  ") is None
    assert format_value(["a", None, "b"]) == "a, b" and format_value([]) is None
    assert format_value(7) == "7" and format_value(b"x") == "x"
    assert item_text({"a": "x", "b": None, "c": ["y"]}, ["c", "b", "a"]) == "c: y a: x"
    assert item_text({"a": None}, ["a"]) == ""


def test_item_table_texts_in_item_index_order(dataset: Path) -> None:
    texts = load_item_texts(dataset, ItemTextOptions(text_keys=("title", "genres", "price")))
    expected = _expected_by_id()
    assert texts.texts[0] == ""
    assert list(texts.texts[1:]) == [DEFAULT_ITEM_PROMPT + expected[i] for i in _ids(dataset)]
    assert texts.keys == ("title", "genres", "price") and texts.source.name == "items.parquet"
    everything = load_item_texts(dataset, ItemTextOptions(prompt=""))
    assert everything.keys == ("title", "genres", "price")  # every non-id column, in table order
    assert list(everything.texts[1:]) == [expected[i] for i in _ids(dataset)]


def test_text_path_keyed_by_original_id(dataset: Path, tmp_path: Path) -> None:
    side = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"item_id": ["30", "10", "20", "99"], "name": ["c", "a", "b", "unused"]}), side)
    texts = load_item_texts(dataset, ItemTextOptions(text_path=side, text_keys=("name",), prompt="P "))
    by_id = {30: "P name: c", 10: "P name: a", 20: "P name: b"}
    assert list(texts.texts[1:]) == [by_id[i] for i in _ids(dataset)]
    assert texts.source == side


def test_missing_text_names_count_ids_file_and_columns(dataset: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_item_texts(dataset, ItemTextOptions(text_keys=("title",)))
    message = str(error.value)
    assert "1 of 3 items have no text" in message and "(item ids 10)" in message
    assert "column(s) title" in message and "items.parquet" in message


def test_text_path_missing_items_is_an_error(dataset: Path, tmp_path: Path) -> None:
    side = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"item_id": [30], "name": ["c"]}), side)
    with pytest.raises(
        ConfigError, match=r"2 of 3 items have no text in column\(s\) name of .*texts.parquet"
    ):
        load_item_texts(dataset, ItemTextOptions(text_path=side))


@pytest.mark.parametrize(
    ("table", "keys", "pattern"),
    [
        (
            {"item_id": [1], "name": ["a"]},
            ("title",),
            r"--text_keys: column\(s\) title not in .* it has: name",
        ),
        ({"id": [1], "name": ["a"]}, None, r"no column 'item_id' to key items by"),
        ({"item_id": [30, 30], "name": ["a", "b"]}, None, r"item id 30 appears more than once"),
    ],
)
def test_text_path_mistakes(dataset: Path, tmp_path: Path, table: dict, keys, pattern: str) -> None:
    side = tmp_path / "texts.parquet"
    pq.write_table(pa.table(table), side)
    with pytest.raises(ConfigError, match=pattern):
        load_item_texts(dataset, ItemTextOptions(text_path=side, text_keys=keys))


def test_unreadable_or_absent_sources(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_item_texts(dataset, ItemTextOptions(text_path=tmp_path / "absent.parquet"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="not a readable parquet file"):
        load_item_texts(dataset, ItemTextOptions(text_path=tmp_path / "bad.parquet"))
    plain = prepare_dataset(
        _interactions(tmp_path / "i2.parquet", [1, 2]), tmp_path / "plain", progress=False
    ).path
    with pytest.raises(
        ConfigError, match="has no item table .* persrec prepare --items FILE, or pass --text_path"
    ):
        load_item_texts(plain)


def test_fingerprint_changes_with_every_input() -> None:
    base = ItemTexts(texts=("", "P a", "P b"), prompt="P ", keys=("title",), source=Path("x"))
    same = ItemTexts(texts=("", "P a", "P b"), prompt="P ", keys=("title",), source=Path("elsewhere"))
    assert base.fingerprint(32) == same.fingerprint(32)
    variants = [
        base.fingerprint(33),
        ItemTexts(texts=("", "P a", "P c"), prompt="P ", keys=("title",), source=Path("x")).fingerprint(32),
        ItemTexts(texts=("", "P a", "P b"), prompt="Q ", keys=("title",), source=Path("x")).fingerprint(32),
        ItemTexts(texts=("", "P a", "P b"), prompt="P ", keys=("name",), source=Path("x")).fingerprint(32),
        ItemTexts(texts=("", "P aP", " b"), prompt="P ", keys=("title",), source=Path("x")).fingerprint(32),
    ]
    assert len({base.fingerprint(32), *variants}) == 1 + len(variants)

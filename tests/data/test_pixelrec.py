"""PixelRec builder: the HLLM folder layout, quoted text with commas, both timestamp spellings."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from persrec.data.datasets.pixelrec import PixelrecOptions, build_pixelrec
from persrec.data.schema import DataValidationError
from tests.data.builder_files import write_pixelrec


def test_hllm_layout(tmp_path: Path) -> None:
    built = build_pixelrec(write_pixelrec(tmp_path / "hllm"), tmp_path / "out")
    rows = pq.read_table(built.interactions).to_pylist()
    # 2020-09-13 12:26:50 UTC is epoch 1600000010.
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in rows] == [
        ("u1", "i2", 1600000005),
        ("u1", "i1", 1600000001),
        ("u2", "i1", 1600000010),
    ]
    items = pq.read_table(built.items).to_pylist()
    assert items[0]["title"] == "Cats, dogs"
    assert items[0]["description"] == 'A video about "cats", and dogs'
    assert items[0]["view_number"] == 100 and items[0]["barrage_number"] == 7
    assert items[1]["tag"] is None and items[1]["description"] is None


def test_named_release_and_explicit_items(tmp_path: Path) -> None:
    root = write_pixelrec(tmp_path / "hllm", name="Pixel1M")
    write_pixelrec(tmp_path / "other", name="Pixel8M")
    options = PixelrecOptions(name="Pixel1M", items=str(tmp_path / "other" / "information" / "Pixel8M.csv"))
    built = build_pixelrec(root, tmp_path / "out", options)
    assert pq.read_table(built.items).num_rows == 2
    with pytest.raises(FileNotFoundError, match="looked for Pixel200K.csv"):
        build_pixelrec(root, tmp_path / "x", PixelrecOptions(name="Pixel200K"))


def test_bad_pixelrec_files(tmp_path: Path) -> None:
    wrong = tmp_path / "ratings.csv"
    wrong.write_text("userId,movieId,rating,timestamp\n1,2,3.0,4\n")
    with pytest.raises(DataValidationError, match=r"missing column\(s\) item_id, user_id; a PixelRec"):
        build_pixelrec(wrong, tmp_path / "out")
    bad_time = tmp_path / "t.csv"
    bad_time.write_text("item_id,user_id,timestamp\ni1,u1,yesterday\n")
    with pytest.raises(DataValidationError, match="timestamp 'yesterday' is neither"):
        build_pixelrec(bad_time, tmp_path / "out")

"""Small raw files in the published schemas of EB-NeRD, MerRec, PixelRec and Amazon, for the builder tests."""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def utc(day: int, second: int = 0) -> datetime:
    return datetime(2023, 2, day, 0, 0, second)


def epoch(day: int, second: int = 0) -> int:
    return int(utc(day, second).replace(tzinfo=timezone.utc).timestamp())


def write_ebnerd(root: Path, articles: bool = True) -> Path:
    """``root/train/{history,behaviors}.parquet`` (+ ``root/articles.parquet``) with EB-NeRD's column types."""
    train = root / "train"
    train.mkdir(parents=True)
    ts = pa.large_list(pa.timestamp("us"))
    history = pa.table(
        {
            "user_id": pa.array([7, 3], pa.uint32()),
            "impression_time_fixed": pa.array([[utc(1, 5), utc(1, 9), utc(2)], [utc(3)]], ts),
            "scroll_percentage_fixed": pa.array([[10.0, None, 90.0], [50.0]], pa.large_list(pa.float32())),
            "article_id_fixed": pa.array([[101, 102, 101], [103]], pa.large_list(pa.int32())),
            "read_time_fixed": pa.array([[3.0, 4.0, 5.0], [6.0]], pa.large_list(pa.float32())),
        }
    )
    pq.write_table(history, train / "history.parquet")
    ids = pa.large_list(pa.int32())
    behaviors = pa.table(
        {
            "impression_id": pa.array([1, 2], pa.uint32()),
            "article_id": pa.array([None, 104], pa.int32()),
            "impression_time": pa.array([utc(5), utc(6)], pa.timestamp("us")),
            "article_ids_inview": pa.array([[104, 105], [101, 106]], ids),
            "article_ids_clicked": pa.array([[105], [101, 106]], ids),
            "user_id": pa.array([3, 7], pa.uint32()),
        }
    )
    pq.write_table(behaviors, train / "behaviors.parquet")
    if articles:
        table = pa.table(
            {
                "article_id": pa.array([101, 102, 103, 104], pa.int32()),
                "title": ["Første nyhed", "Second", "Third", "Fourth"],
                "subtitle": ["sub", "  ", None, "four"],
                "body": ["b1", "b2", "b3", "b4"],
                "topics": pa.array([["Sport", "Fodbold"], [], None, ["Krimi"]], pa.list_(pa.string())),
                "category_str": ["sport", "nyheder", "sport", "krimi"],
                "published_time": pa.array([utc(1)] * 4, pa.timestamp("us")),
                "total_inviews": pa.array([1, 2, 3, 4], pa.int32()),
            }
        )
        pq.write_table(table, root / "articles.parquet")
    return root


def write_merrec(path: Path, stime_type: str = "timestamp") -> Path:
    """Six MerRec events of two users; ``stime`` as a timestamp or as epoch seconds."""
    times = [utc(1, s) for s in (1, 2, 3, 4, 5, 6)]
    stime = (
        pa.array(times, pa.timestamp("us"))
        if stime_type == "timestamp"
        else pa.array([epoch(1, s) for s in (1, 2, 3, 4, 5, 6)], pa.int64())
    )
    table = pa.table(
        {
            "user_id": pa.array([1, 1, 2, 2, 1, 2], pa.int64()),
            "sequence_id": pa.array([10, 10, 20, 20, 11, 20], pa.int64()),
            "session_id": ["s1", "s1", "s2", "s2", "s3", "s2"],
            "item_id": ["m1", "m2", "m3", "m4", "m5", "m6"],
            "product_id": ["p1", "p2", "p1", "p3", "p1", "p2"],
            "event_id": ["item_view", "buy_comp", "item_like", "item_view", "item_view", "offer_make"],
            "stime": stime,
            "name": ["old name", "shoe", "older", None, "new name", "  "],
            "brand_name": ["acme", None, "acme", "zen", None, "nike"],
            "c0_name": ["Women", "Men", "Women", "Kids", "Women", "Men"],
            "c1_name": ["Tops", None, "Tops", None, "Tops", "Shoes"],
            "c2_name": [None, None, "T-shirts", None, None, None],
            "price": [10.0, 20.0, 11.0, 5.0, 9.0, 19.0],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_pixelrec(root: Path, name: str = "Pixel200K") -> Path:
    (root / "dataset").mkdir(parents=True)
    (root / "information").mkdir()
    (root / "dataset" / f"{name}.csv").write_text(
        "item_id,user_id,timestamp\ni2,u1,1600000005\ni1,u1,1600000001\ni1,u2,2020-09-13 12:26:50\n"
    )
    (root / "information" / f"{name}.csv").write_text(
        "item_id,view_number,comment_number,thumbup_number,share_number,coin_number,favorite_number,"
        "barrage_number,title,tag,description\n"
        'i1,100,2,3,4,5,6,7,"Cats, dogs","pets","A video about ""cats"", and dogs"\n'
        "i2,5,0,0,0,0,0,0,Cooking,, \n"
    )
    return root


def literal_meta_line(record: dict[str, object]) -> str:
    """A 2014 meta line: Python literal syntax (single quotes), as the McAuley files are written."""
    return repr(record) + "\n"


def write_amazon_2014(root: Path, category: str = "Toys") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    # No header: user,item,rating,timestamp
    (root / f"ratings_{category}.csv").write_text(
        "A1,B01,5.0,1356220800\nA1,B02,3.0,1356220800\nA2,B01,4.0,1356307200\nA1,B03,1.0,1356393600\n"
    )
    lines = [
        literal_meta_line(
            {
                "asin": "B01",
                "title": "Tool Box &amp; Easel",
                "description": "Learn &quot;fast&quot;",
                "categories": [["Toys & Games", "Arts"], ["Toys & Games"]],
                "salesRank": {"Toys & Games": 12},
                "related": {"also_bought": ["B02"]},
                "price": 3.5,
            }
        ),
        literal_meta_line({"asin": "B02", "categories": [["Toys & Games"]], "brand": "Melissa &amp; Doug"}),
        literal_meta_line({"asin": "B03", "title": 'It\'s "quoted"', "description": "   "}),
    ]
    with gzip.open(root / f"meta_{category}.json.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(lines)
    return root


def write_amazon_2018(root: Path, category: str = "Books") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    # No header, item first: item,user,rating,timestamp
    (root / f"{category}.csv").write_text(
        "0001,U9,5.0,1500000000\n0002,U9,4.0,1500000100\n0001,U8,2.0,1500000200\n"
    )
    records = [
        {
            "asin": "0001",
            "title": "A &amp; B",
            "description": ["Para one.", "Para &lt;two&gt;."],
            "category": ["Books", "Fiction"],
        },
        {"asin": "0002", "title": "", "description": [], "category": [], "brand": "Penguin"},
    ]
    with gzip.open(root / f"meta_{category}.json.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    return root

"""MovieLens CSV releases (ML-20M layout) through the streaming builder, against the in-memory reader."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from persrec.data.datasets.movielens import build_ml_latest_small
from persrec.data.datasets.movielens_csv import build_movielens
from persrec.data.datasets.registry import shared_data_dir
from persrec.data.schema import DataValidationError


def _write_ml20m(root: Path) -> Path:
    root.mkdir()
    (root / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,3.5,1112484676\n2,2,4.0,974820889\n"
    )
    (root / "movies.csv").write_text(
        "movieId,title,genres\n2,Jumanji (1995),Adventure|Children|Fantasy\n"
        '29,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama\n'
        "30,Untitled,(no genres listed)\n"
    )
    (root / "tags.csv").write_text("userId,movieId,tag,timestamp\n1,2,fun,1\n2,2,Fun,2\n2,2,board game,3\n")
    return root


def test_ml20m_layout(tmp_path: Path) -> None:
    built = build_movielens(_write_ml20m(tmp_path / "ml-20m"), tmp_path / "out")
    rows = pq.read_table(built.interactions).to_pylist()
    assert rows == [
        {"user_id": 1, "item_id": 2, "timestamp": 1112486027, "rating": 3.5},
        {"user_id": 1, "item_id": 29, "timestamp": 1112484676, "rating": 3.5},
        {"user_id": 2, "item_id": 2, "timestamp": 974820889, "rating": 4.0},
    ]
    items = pq.read_table(built.items).to_pylist()
    assert items[0] == {
        "item_id": 2,
        "title": "Jumanji",
        "year": 1995,
        "genres": "Adventure, Children, Fantasy",
        "tags": "fun, board game",
    }
    assert items[1]["title"] == "City of Lost Children, The (Cité des enfants perdus, La)"
    assert items[2]["genres"] is None and items[2]["year"] is None


def test_wrong_header(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "ratings.csv").write_text("user,item,rating,time\n1,2,3,4\n")
    (root / "movies.csv").write_text("movieId,title,genres\n")
    with pytest.raises(DataValidationError, match=r"missing column\(s\) userId, movieId, timestamp"):
        build_movielens(root, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="movielens expects ratings.csv"):
        build_movielens(tmp_path, tmp_path / "out")


@pytest.mark.shared_data
def test_same_as_latest_small_reader(tmp_path: Path) -> None:
    root = shared_data_dir()
    if root is None or not (root / "movielens-latest-small" / "ratings.csv").is_file():
        pytest.skip("shared movielens-latest-small not available (set PERSREC_SHARED_DATA)")
    raw = root / "movielens-latest-small"
    streamed = build_movielens(raw, tmp_path / "a")
    reference = build_ml_latest_small(raw, tmp_path / "b")
    assert pq.read_table(streamed.items).equals(pq.read_table(reference.items))
    a, b = pq.read_table(streamed.interactions), pq.read_table(reference.interactions)
    key = [("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")]
    assert a.num_rows == b.num_rows == 100836
    assert a.sort_by(key).cast(b.schema).equals(b.sort_by(key))


@pytest.mark.shared_data
def test_ml1m_folder_through_movielens_format(tmp_path: Path) -> None:
    root = shared_data_dir()
    if root is None or not (root / "movielens-1m" / "interactions.csv.gz").is_file():
        pytest.skip("shared movielens-1m not available (set PERSREC_SHARED_DATA)")
    built = build_movielens(root / "movielens-1m", tmp_path / "out")
    assert built.name == "ml-1m" and pq.read_metadata(built.interactions).num_rows == 999611

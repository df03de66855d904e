"""MovieLens builders on tiny hand-written files in both ML-1M layouts, plus the embedded resource."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from persrec.data.datasets.movielens import (
    BuiltDataset,
    build_ml_1m,
    build_ml_latest_small,
    format_genres,
    ml_1m_layout,
    split_title_year,
)
from persrec.data.datasets.registry import embedded_dataset_dir, shared_data_candidates, shared_data_dir

MOVIES_DAT = (
    "1::Toy Story (1995)::Animation|Children's|Comedy\n"
    "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
    "3::Metisse (Café au Lait) (1993)::Comedy\n"
    "4::Misérables, Les (1995)::Drama|Musical\n"
)
# Unsorted on purpose; user 2 has a timestamp tie whose file order (4 before 1) must survive.
RATINGS_DAT = (
    "2::3::4::978300200\n1::2::3::978300100\n2::4::5::978300150\n2::1::2::978300150\n1::1::5::978300000\n"
)


def _write_ml_1m_raw(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.dat").write_bytes(RATINGS_DAT.encode("iso-8859-1"))
    (root / "movies.dat").write_bytes(MOVIES_DAT.encode("iso-8859-1"))
    return root


def _write_ml_1m_core(root: Path) -> Path:
    (root / "grouplens").mkdir(parents=True, exist_ok=True)
    (root / "grouplens" / "movies.dat").write_bytes(MOVIES_DAT.encode("iso-8859-1"))
    rows = "user_id,movie_id,timestamp\n1,1,978300000\n1,2,978300100\n2,4,978300150\n2,1,978300150\n2,3,978300200\n"
    with gzip.open(root / "interactions.csv.gz", "wt", encoding="utf-8") as handle:
        handle.write(rows)
    return root


def _write_latest_small(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "7,10,4.5,1000\n"
        "3,20,3.0,500\n"
        "7,30,2.0,900\n"
        "3,10,5.0,400\n"
        "7,20,0.5,1000\n",
        encoding="utf-8",
    )
    (root / "movies.csv").write_text(
        "movieId,title,genres\n"
        '10,"American President, The (1995)",Comedy|Drama|Romance\n'
        "20,Café Society (2016),Comedy|Drama\n"
        "30,Black Mirror,(no genres listed)\n"
        "40,Death Note: Desu nôto (2006–2007),Animation\n",
        encoding="utf-8",
    )
    (root / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n"
        "3,10,politics,1\n"
        "7,10,Aaron Sorkin,2\n"
        "7,10,Politics,3\n"
        "3,30,dystopia,4\n",
        encoding="utf-8",
    )
    return root


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Toy Story (1995)", ("Toy Story", 1995)),
        ("  Black Mirror ", ("Black Mirror", None)),
        ("Death Note: Desu nôto (2006–2007)", ("Death Note: Desu nôto", 2006)),
        ("Metisse (Café au Lait) (1993)", ("Metisse (Café au Lait)", 1993)),
        ("1984 (1984)", ("1984", 1984)),
    ],
)
def test_split_title_year(raw: str, expected: tuple[str, int | None]) -> None:
    assert split_title_year(raw) == expected


def test_format_genres() -> None:
    assert format_genres("Animation|Children's|Comedy") == "Animation, Children's, Comedy"
    assert format_genres("(no genres listed)") is None
    assert format_genres("") is None


# ------------------------------------------------------------------------------------------------ ML-1M


def test_ml_1m_grouplens_layout(tmp_path: Path) -> None:
    raw = _write_ml_1m_raw(tmp_path / "raw")
    assert ml_1m_layout(raw) == "grouplens"
    built = build_ml_1m(raw, tmp_path / "out")

    assert isinstance(built, BuiltDataset)
    assert (built.name, built.min_user_interactions, built.min_item_interactions) == ("ml-1m", 5, 5)
    table = pq.read_table(built.interactions)
    assert table.column_names == ["user_id", "item_id", "timestamp", "rating"]
    assert str(table.schema.field("timestamp").type) == "int64"
    rows = table.to_pylist()
    assert [(r["user_id"], r["item_id"]) for r in rows] == [(1, 1), (1, 2), (2, 4), (2, 1), (2, 3)]
    assert [r["rating"] for r in rows] == [5, 3, 5, 2, 4]

    items = {r["item_id"]: r for r in _rows(built.items)}
    assert items[3] == {"item_id": 3, "title": "Metisse (Café au Lait)", "year": 1993, "genres": "Comedy"}
    assert items[4]["title"] == "Misérables, Les"
    assert items[1]["genres"] == "Animation, Children's, Comedy"
    assert _no_temp_files(tmp_path / "out")


def test_ml_1m_five_core_layout(tmp_path: Path) -> None:
    raw = _write_ml_1m_core(tmp_path / "movielens-1m")
    assert ml_1m_layout(raw) == "5-core"
    built = build_ml_1m(raw, tmp_path / "out")

    table = pq.read_table(built.interactions)
    assert table.column_names == ["user_id", "item_id", "timestamp"]
    assert [(r["user_id"], r["item_id"]) for r in table.to_pylist()] == [
        (1, 1),
        (1, 2),
        (2, 4),
        (2, 1),
        (2, 3),
    ]
    assert {r["item_id"]: r["title"] for r in _rows(built.items)}[3] == "Metisse (Café au Lait)"
    assert (built.min_user_interactions, built.min_item_interactions) == (5, 5)


def test_ml_1m_layouts_agree(tmp_path: Path) -> None:
    raw = build_ml_1m(_write_ml_1m_raw(tmp_path / "a"), tmp_path / "out-a")
    core = build_ml_1m(_write_ml_1m_core(tmp_path / "b"), tmp_path / "out-b")
    keys = ["user_id", "item_id", "timestamp"]
    assert pq.read_table(raw.interactions).select(keys).equals(pq.read_table(core.interactions))
    assert pq.read_table(raw.items).equals(pq.read_table(core.items))


def test_ml_1m_missing_files_lists_expected(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::1::5::1\n")
    assert ml_1m_layout(tmp_path) is None
    with pytest.raises(FileNotFoundError) as err:
        build_ml_1m(tmp_path, tmp_path / "out")
    for name in ("ratings.dat", "movies.dat", "interactions.csv.gz", "grouplens/movies.dat"):
        assert name in str(err.value)


def test_ml_1m_bad_line_is_rejected(tmp_path: Path) -> None:
    raw = _write_ml_1m_raw(tmp_path / "raw")
    (raw / "movies.dat").write_bytes(b"1::no genres field\n")
    with pytest.raises(ValueError, match="MovieID::Title::Genres"):
        build_ml_1m(raw, tmp_path / "out")


# ------------------------------------------------------------------------------------------------ latest-small


def test_ml_latest_small_builder(tmp_path: Path) -> None:
    built = build_ml_latest_small(_write_latest_small(tmp_path / "raw"), tmp_path / "out")
    assert (built.name, built.min_user_interactions, built.min_item_interactions) == ("ml-latest-small", 0, 0)

    rows = _rows(built.interactions)
    # Sorted by (user, time); the tie of user 7 at t=1000 keeps file order (10 before 20).
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in rows] == [
        (3, 10, 400),
        (3, 20, 500),
        (7, 30, 900),
        (7, 10, 1000),
        (7, 20, 1000),
    ]
    assert [r["rating"] for r in rows] == [5.0, 3.0, 2.0, 4.5, 0.5]

    items = {r["item_id"]: r for r in _rows(built.items)}
    assert list(items) == [10, 20, 30, 40]
    assert items[10] == {
        "item_id": 10,
        "title": "American President, The",
        "year": 1995,
        "genres": "Comedy, Drama, Romance",
        "tags": "politics, Aaron Sorkin",
    }
    assert items[20]["title"] == "Café Society"
    assert items[30] == {
        "item_id": 30,
        "title": "Black Mirror",
        "year": None,
        "genres": None,
        "tags": "dystopia",
    }
    assert items[40]["year"] == 2006 and items[40]["tags"] is None
    assert _no_temp_files(tmp_path / "out")


def test_ml_latest_small_without_tags(tmp_path: Path) -> None:
    raw = _write_latest_small(tmp_path / "raw")
    (raw / "tags.csv").unlink()
    built = build_ml_latest_small(raw, tmp_path / "out")
    assert all(r["tags"] is None for r in _rows(built.items))


def test_ml_latest_small_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ratings.csv"):
        build_ml_latest_small(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------------ embedded


def test_embedded_resource_counts_and_licence() -> None:
    root = embedded_dataset_dir()
    table = pq.read_table(root / "interactions.parquet")
    users = table["user_id"].to_numpy()
    assert table.num_rows == 100_836
    assert np.unique(users).size == 610
    assert np.unique(table["item_id"].to_numpy()).size == 9_724
    assert np.bincount(users).max() == 2_698
    assert pq.read_table(root / "items.parquet").num_rows == 9_742
    assert "may redistribute the data set" in (root / "README.txt").read_text(encoding="utf-8")
    assert (root / "SOURCE.md").is_file()
    size = sum(p.stat().st_size for p in root.iterdir())
    assert size < 1_200_000, f"embedded dataset grew to {size} bytes"


def _shared(folder: str) -> Path:
    root = shared_data_dir() or shared_data_candidates()[0]
    path = root / folder
    if not path.is_dir():
        pytest.skip(f"shared dataset {folder} not found at {path}; set PERSREC_SHARED_DATA")
    return path


@pytest.mark.shared_data
def test_embedded_resource_matches_a_fresh_build(tmp_path: Path) -> None:
    built = build_ml_latest_small(_shared("movielens-latest-small"), tmp_path)
    root = embedded_dataset_dir()
    assert pq.read_table(built.interactions).equals(pq.read_table(root / "interactions.parquet"))
    assert pq.read_table(built.items).equals(pq.read_table(root / "items.parquet"))


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_ml_1m_five_core_copy(tmp_path: Path) -> None:
    built = build_ml_1m(_shared("movielens-1m"), tmp_path)
    table = pq.read_table(built.interactions)
    assert table.num_rows == 999_611
    assert np.unique(table["user_id"].to_numpy()).size == 6_040
    assert np.unique(table["item_id"].to_numpy()).size == 3_416
    assert table.slice(0, 1).to_pylist()[0]["user_id"] == 1
    assert pq.read_table(built.items).num_rows == 3_883

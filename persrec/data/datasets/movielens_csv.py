"""MovieLens CSV releases (ML-20M, and ML-25M / ml-latest in the same layout) to canonical parquet.

Source: https://grouplens.org/datasets/movielens/20m/ (Harper & Konstan, 2015). Files: ``ratings.csv``
(``userId,movieId,rating,timestamp``, 20,000,263 rows for ML-20M), ``movies.csv`` (``movieId,title,genres``,
27,278 movies) and optionally ``tags.csv``. Licence: GroupLens research use only, no commercial use without
permission, no redistribution without permission; cite Harper & Konstan (2015). Expected ML-20M counts: 138,493
users, 26,744 rated movies, 20,000,263 ratings (every user has at least 20 ratings, so no filter is recorded;
the HSTU ml-20m benchmark uses them all).

The ratings (hundreds of MB) stream through DuckDB; the movie and tag tables are small and use the item text
conventions of :mod:`persrec.data.datasets.movielens` (``title`` without the year, ``year``, ``genres`` joined
with ``", "``, ``tags`` joined with ``", "`` most frequent first). ``--format movielens`` also accepts an ML-1M
folder (``ratings.dat`` + ``movies.dat``), which goes to :func:`build_ml_1m`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from persrec.data.datasets.builder_io import copy_to_parquet, duck, read_head_lines, require_columns, sql_path
from persrec.data.datasets.movielens import (
    INTERACTIONS_FILE,
    ITEMS_FILE,
    ML_1M_CORE_FILES,
    ML_1M_RAW_FILES,
    BuiltDataset,
    _aggregate_tags,
    _items_table,
    _read_csv,
    build_ml_1m,
    ml_1m_layout,
    write_parquet_atomic,
)

ML_20M_LICENSE = (
    "GroupLens MovieLens 20M: research use only, no endorsement implied, cite Harper & Konstan (2015), "
    "no commercial use without permission; may NOT be redistributed without separate permission."
)
RATINGS_HEADER = ["userId", "movieId", "rating", "timestamp"]
CSV_FILES = ["ratings.csv", "movies.csv"]


@dataclass(frozen=True)
class MovielensOptions:
    """No options: each release is built as GroupLens published it."""


def _root(path: Path) -> Path:
    path = Path(path).expanduser()
    root = path.parent if path.is_file() else path
    if not root.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory (movielens input)")
    return root


def layout(root: Path) -> str:
    if all((root / f).is_file() for f in CSV_FILES):
        return "csv"
    if ml_1m_layout(root) is not None:
        return "ml-1m"
    raise FileNotFoundError(
        f"{root}: no MovieLens files; movielens expects {' + '.join(CSV_FILES)} (ML-20M, ML-25M, ml-latest) "
        "or ratings.dat + movies.dat (ML-1M)"
    )


def input_files(path: Path, options: MovielensOptions) -> list[Path]:
    root = _root(path)
    if layout(root) == "ml-1m":
        names = ML_1M_RAW_FILES if ml_1m_layout(root) == "grouplens" else ML_1M_CORE_FILES
        return [root / n for n in names]
    return [root / f for f in [*CSV_FILES, "tags.csv"] if (root / f).is_file()]


def build_movielens(
    path: Path, out_dir: Path, options: MovielensOptions = MovielensOptions()
) -> BuiltDataset:
    """Build a MovieLens CSV release (or ML-1M) as canonical parquet under ``out_dir``."""
    root = _root(path)
    if layout(root) == "ml-1m":
        return build_ml_1m(root, out_dir)
    out_dir = Path(out_dir)
    header = read_head_lines(root / "ratings.csv", 1)
    require_columns(
        root / "ratings.csv",
        header[0].split(",") if header else [],
        RATINGS_HEADER,
        "a MovieLens ratings.csv",
    )
    with duck() as con:
        copy_to_parquet(
            con,
            "SELECT userId AS user_id, movieId AS item_id, timestamp, CAST(rating AS FLOAT) AS rating "
            f"FROM read_csv({sql_path(root / 'ratings.csv')}, header=true, "
            "columns={'userId': 'BIGINT', 'movieId': 'BIGINT', 'rating': 'DOUBLE', 'timestamp': 'BIGINT'})",
            out_dir / INTERACTIONS_FILE,
            root / "ratings.csv",
        )
    movies = _read_csv(
        root / "movies.csv", {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}
    )
    tags: dict[int, str] = {}
    if (root / "tags.csv").is_file():
        tag_table = _read_csv(root / "tags.csv", {"movieId": pa.int64(), "tag": pa.string()})
        tags = _aggregate_tags(tag_table["movieId"].to_pylist(), tag_table["tag"].to_pylist())
    items = _items_table(
        movies["movieId"].to_pylist(),
        [t or "" for t in movies["title"].to_pylist()],
        [g or "" for g in movies["genres"].to_pylist()],
        tags,
    )
    return BuiltDataset(
        interactions=out_dir / INTERACTIONS_FILE,
        items=write_parquet_atomic(items, out_dir / ITEMS_FILE),
        min_user_interactions=0,
        min_item_interactions=0,
        name="movielens",
        license_note=ML_20M_LICENSE,
    )

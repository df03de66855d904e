"""Builders that turn GroupLens MovieLens files into the library's canonical parquet.

Canonical form: ``interactions.parquet`` (``user_id``, ``item_id``, ``timestamp`` as int64 epoch seconds, plus
optional extras such as ``rating``), one row per interaction, rows grouped by user in chronological order (ties
keep the order of the source file); and ``items.parquet`` keyed by ``item_id`` with text columns.

Item text conventions, shared by all MovieLens builders so that text models see one format:

* ``title``: the title with the trailing ``(YYYY)`` removed (GroupLens keeps articles inverted, e.g.
  ``"Matrix, The"``; we leave them as published);
* ``year``: the release year as an integer, null when the title carries none;
* ``genres``: the ``|``-separated GroupLens genres re-joined with ``", "`` (reads as plain text for a text
  encoder), null for ``"(no genres listed)"``;
* ``tags`` (ml-latest-small only): the distinct user tags of the movie joined by ``", "``, most frequent first.
  Tags are aggregated over all users and all time, so they carry a little information from after any
  split point; they are item side information, not a per-user signal.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from persrec.atomic import atomic_path

INTERACTIONS_FILE = "interactions.parquet"
ITEMS_FILE = "items.parquet"

ML_LATEST_SMALL_LICENSE = (
    "GroupLens ml-latest-small: research use only, no endorsement implied, cite Harper & Konstan (2015), "
    "no commercial use without permission; may be redistributed (including transformations) under the same "
    "licence (see README.txt)."
)
ML_1M_LICENSE = (
    "GroupLens MovieLens 1M: research use only, no endorsement implied, cite Harper & Konstan (2015), "
    "no commercial use without permission; may NOT be redistributed without separate permission."
)

# Trailing "(1995)" or a series range such as "(2006–2007)"; the first year is kept.
_YEAR_RE = re.compile(r"\s*\((\d{4})(?:\s*[-\u2013]\s*\d{4})?\)\s*$")
_NO_GENRES = "(no genres listed)"


@dataclass(frozen=True)
class BuiltDataset:
    """Where a builder wrote its canonical parquet, and the filter the benchmark protocol expects.

    The filter is recorded rather than applied so that the raw interactions stay intact on disk and the
    preparation step (which owns filtering) reproduces the protocol.
    """

    interactions: Path
    items: Path | None
    min_user_interactions: int
    min_item_interactions: int
    name: str
    license_note: str


# --------------------------------------------------------------------------------------------------- writing


def write_parquet_atomic(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` via a temporary file so readers never see a half-written parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def _narrow_int(array: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Cast an integer id column to int32 when every value fits, to keep the files compact."""
    if len(array) == 0:
        return array.cast(pa.int32())
    lo, hi = pc.min_max(array).values()
    info = np.iinfo(np.int32)
    if lo.as_py() >= info.min and hi.as_py() <= info.max:
        return array.cast(pa.int32())
    return array.cast(pa.int64())


def _canonical_interactions(table: pa.Table) -> pa.Table:
    """Order rows by (user, time) with a stable sort and give the key columns their canonical types."""
    order = pc.sort_indices(table, sort_keys=[("user_id", "ascending"), ("timestamp", "ascending")])
    table = table.take(order)
    columns = {
        "user_id": _narrow_int(table["user_id"]),
        "item_id": _narrow_int(table["item_id"]),
        "timestamp": table["timestamp"].cast(pa.int64()),
    }
    for name in table.column_names:
        if name not in columns:
            columns[name] = table[name]
    return pa.table(columns)


# --------------------------------------------------------------------------------------------------- items


def split_title_year(raw_title: str) -> tuple[str, int | None]:
    """Split ``"Toy Story (1995)"`` into ``("Toy Story", 1995)``; titles without a year keep ``None``."""
    title = raw_title.strip()
    match = _YEAR_RE.search(title)
    if match is None:
        return title, None
    return title[: match.start()].strip(), int(match.group(1))


def format_genres(raw_genres: str) -> str | None:
    """Turn GroupLens ``"A|B"`` into ``"A, B"``; the placeholder for no genres becomes null."""
    raw = raw_genres.strip()
    if not raw or raw == _NO_GENRES:
        return None
    return ", ".join(g.strip() for g in raw.split("|") if g.strip())


def _items_table(
    ids: list[int], titles: list[str], genres: list[str], tags: dict[int, str] | None = None
) -> pa.Table:
    split = [split_title_year(t) for t in titles]
    columns: dict[str, pa.Array] = {
        "item_id": _narrow_int(pa.array(ids, type=pa.int64())),
        "title": pa.array([s[0] for s in split], type=pa.string()),
        "year": pa.array([s[1] for s in split], type=pa.int16()),
        "genres": pa.array([format_genres(g) for g in genres], type=pa.string()),
    }
    if tags is not None:
        columns["tags"] = pa.array([tags.get(i) for i in ids], type=pa.string())
    table = pa.table(columns)
    if len(set(ids)) != len(ids):
        raise ValueError("movie table has duplicate movie ids")
    return table.take(pc.sort_indices(table["item_id"]))


def _aggregate_tags(movie_ids: list[int], tags: list[str]) -> dict[int, str]:
    """Distinct tags per movie (case-insensitive), most frequent first, then by first appearance."""
    counts: dict[int, Counter[str]] = {}
    spelling: dict[tuple[int, str], str] = {}
    first_seen: dict[tuple[int, str], int] = {}
    for row, (movie, tag) in enumerate(zip(movie_ids, tags, strict=True)):
        text = " ".join(str(tag).split())
        if not text:
            continue
        key = text.casefold()
        counts.setdefault(movie, Counter())[key] += 1
        spelling.setdefault((movie, key), text)
        first_seen.setdefault((movie, key), row)
    out: dict[int, str] = {}
    for movie, counter in counts.items():
        ordered = sorted(counter, key=lambda k: (-counter[k], first_seen[(movie, k)]))
        out[movie] = ", ".join(spelling[(movie, k)] for k in ordered)
    return out


# --------------------------------------------------------------------------------------------------- readers


def _require(raw_dir: Path, names: list[str], dataset: str) -> None:
    missing = [n for n in names if not (raw_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{dataset}: missing {', '.join(missing)} in {raw_dir} (expected files: {', '.join(names)})"
        )


def _read_csv(path: Path, types: dict[str, pa.DataType]) -> pa.Table:
    return pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(column_types=types, include_columns=list(types)),
    )


def _read_double_colon(path: Path, names: list[str], types: dict[str, pa.DataType]) -> pa.Table:
    """Read a numeric ``::``-separated GroupLens file (e.g. ``ratings.dat``) with the fast CSV reader."""
    data = path.read_bytes().replace(b"::", b",")
    return pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=names),
        convert_options=pacsv.ConvertOptions(column_types=types),
    )


def _read_movies_dat(path: Path) -> pa.Table:
    """Parse ``movies.dat`` (``MovieID::Title::Genres``, ISO-8859-1); titles may contain commas and colons."""
    ids: list[int] = []
    titles: list[str] = []
    genres: list[str] = []
    with path.open(encoding="iso-8859-1", newline="") as handle:
        for lineno, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            movie, sep, rest = line.partition("::")
            title, sep2, genre = rest.rpartition("::")
            if not sep or not sep2:
                raise ValueError(f"{path}:{lineno}: expected MovieID::Title::Genres, got {line!r}")
            ids.append(int(movie))
            titles.append(title)
            genres.append(genre)
    return _items_table(ids, titles, genres)


# --------------------------------------------------------------------------------------------------- builders


def build_ml_latest_small(raw_dir: Path, out_dir: Path) -> BuiltDataset:
    """Build canonical parquet from GroupLens ``ml-latest-small`` CSVs (ratings, movies, optional tags).

    Every movie of ``movies.csv`` is kept in the item table (a few are never rated); ``rating`` stays as an
    extra interaction column. No filter: GroupLens selected users with at least 20 ratings.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    _require(raw_dir, ["ratings.csv", "movies.csv"], "ml-latest-small")
    ratings = _read_csv(
        raw_dir / "ratings.csv",
        {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()},
    ).rename_columns(["user_id", "item_id", "rating", "timestamp"])
    interactions = _canonical_interactions(ratings.select(["user_id", "item_id", "timestamp", "rating"]))

    movies = _read_csv(
        raw_dir / "movies.csv", {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}
    )
    tags = None
    if (raw_dir / "tags.csv").is_file():
        tag_table = _read_csv(raw_dir / "tags.csv", {"movieId": pa.int64(), "tag": pa.string()})
        tags = _aggregate_tags(tag_table["movieId"].to_pylist(), tag_table["tag"].to_pylist())
    items = _items_table(
        movies["movieId"].to_pylist(),
        movies["title"].to_pylist(),
        [g or "" for g in movies["genres"].to_pylist()],
        tags if tags is not None else {},
    )
    return BuiltDataset(
        interactions=write_parquet_atomic(interactions, out_dir / INTERACTIONS_FILE),
        items=write_parquet_atomic(items, out_dir / ITEMS_FILE),
        min_user_interactions=0,
        min_item_interactions=0,
        name="ml-latest-small",
        license_note=ML_LATEST_SMALL_LICENSE,
    )


ML_1M_RAW_FILES = ["ratings.dat", "movies.dat"]
ML_1M_CORE_FILES = ["interactions.csv.gz", "grouplens/movies.dat"]


def ml_1m_layout(raw_dir: Path) -> str | None:
    """Which ML-1M layout ``raw_dir`` holds: ``"grouplens"`` (ratings.dat), ``"5-core"`` (csv copy) or None."""
    raw_dir = Path(raw_dir)
    if all((raw_dir / n).is_file() for n in ML_1M_RAW_FILES):
        return "grouplens"
    if all((raw_dir / n).is_file() for n in ML_1M_CORE_FILES):
        return "5-core"
    return None


def build_ml_1m(raw_dir: Path, out_dir: Path) -> BuiltDataset:
    """Build canonical parquet from MovieLens-1M, from either the GroupLens files or the 5-core csv copy.

    Layouts, detected by which files exist (the GroupLens one wins when both are present):

    * ``ratings.dat`` + ``movies.dat`` (original GroupLens, ``::``-separated, ISO-8859-1): ``rating`` is kept;
    * ``interactions.csv.gz`` (``user_id,movie_id,timestamp``, already 5-core filtered) + ``grouplens/movies.dat``.

    Both record a 5/5 minimum so that preparing either gives the SASRec / generative-recommenders "ml-1m"
    (6,040 users, 3,416 items); on the 5-core copy the filter is a no-op.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    layout = ml_1m_layout(raw_dir)
    if layout == "grouplens":
        table = _read_double_colon(
            raw_dir / "ratings.dat",
            ["user_id", "item_id", "rating", "timestamp"],
            {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.int8(), "timestamp": pa.int64()},
        )
        interactions = _canonical_interactions(table.select(["user_id", "item_id", "timestamp", "rating"]))
        movies_path = raw_dir / "movies.dat"
    elif layout == "5-core":
        table = _read_csv(
            raw_dir / "interactions.csv.gz",
            {"user_id": pa.int64(), "movie_id": pa.int64(), "timestamp": pa.int64()},
        ).rename_columns(["user_id", "item_id", "timestamp"])
        interactions = _canonical_interactions(table)
        movies_path = raw_dir / "grouplens" / "movies.dat"
    else:
        raise FileNotFoundError(
            f"ml-1m: no known layout in {raw_dir}; expected either {' + '.join(ML_1M_RAW_FILES)} "
            f"(GroupLens ml-1m) or {' + '.join(ML_1M_CORE_FILES)} (5-core copy)"
        )
    items = _read_movies_dat(movies_path)
    return BuiltDataset(
        interactions=write_parquet_atomic(interactions, out_dir / INTERACTIONS_FILE),
        items=write_parquet_atomic(items, out_dir / ITEMS_FILE),
        min_user_interactions=5,
        min_item_interactions=5,
        name="ml-1m",
        license_note=ML_1M_LICENSE,
    )

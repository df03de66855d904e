"""EB-NeRD (Ekstra Bladet News Recommendation Dataset) to canonical parquet.

Source: https://recsys.eb.dk (RecSys Challenge 2024), releases ``ebnerd_demo`` / ``ebnerd_small`` /
``ebnerd_large``, each with ``articles.parquet`` and ``train/`` + ``validation/`` folders holding
``history.parquet`` and ``behaviors.parquet``. Licence: released by Ekstra Bladet for non-commercial research
under the RecSys '24 Challenge terms; cite Kruse et al., "EB-NeRD" (RecSys Challenge 2024). Publisher's figures
for ``ebnerd_large``: about 1.1 M users, 125 k articles and 38 M impression logs (not re-measured here). The
official toolbox's test fixture (44 users, 8,303 history clicks on 2,194 articles, no articles file) builds to
44 users / 2,194 items / 8,303 interactions.

What is read:

* ``history.parquet``: one row per user with parallel lists ``article_id_fixed`` and ``impression_time_fixed``
  (plus ``scroll_percentage_fixed`` and ``read_time_fixed``, kept as extra columns with ``keep_engagement``);
  every list position is one click, as the PerSRec EB-NeRD preprocessing reads it;
* ``behaviors.parquet`` (optional, ``behaviors``): each impression's ``article_ids_clicked`` at its
  ``impression_time`` are added as further clicks;
* ``articles.parquet`` (optional): the item table keyed by ``article_id``. Text columns ``title``,
  ``subtitle``, ``body``, ``category_str`` and ``article_type`` stay plain strings; the ``topics`` list is joined
  into one string with ``", "`` (so every text column reads as plain text); ``published_time`` is kept as a
  timestamp. Columns missing from a release are simply absent.

The paper's user filter (``eb_nerd_512``: users with at least 512 clicks) is ``min_clicks=512``; it is recorded
as the prepared dataset's user minimum, so the raw clicks stay intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from persrec.data.datasets.builder_io import (
    copy_to_parquet,
    duck,
    epoch_seconds_sql,
    fetch_one,
    ident,
    joined_list_sql,
    nonempty_text_sql,
    parquet_schema,
    require_columns,
    sql_path,
)
from persrec.data.datasets.movielens import INTERACTIONS_FILE, ITEMS_FILE, BuiltDataset
from persrec.data.schema import DataValidationError

EBNERD_LICENSE = (
    "EB-NeRD (Ekstra Bladet): non-commercial research use under the RecSys '24 Challenge terms; cite the "
    "EB-NeRD dataset paper; do not redistribute."
)
HISTORY_COLUMNS = ["user_id", "article_id_fixed", "impression_time_fixed"]
ENGAGEMENT_COLUMNS = {"scroll_percentage_fixed": "scroll_percentage", "read_time_fixed": "read_time"}
BEHAVIOR_COLUMNS = ["user_id", "impression_time", "article_ids_clicked"]
ARTICLE_TEXT_COLUMNS = ["title", "subtitle", "body", "category_str", "article_type"]
ARTICLE_LIST_COLUMNS = ["topics"]


@dataclass(frozen=True)
class EbnerdOptions:
    split: str = field(
        default="train", metadata={"help": "split folder whose history.parquet is read (train or validation)"}
    )
    behaviors: bool = field(
        default=False, metadata={"help": "also add the clicks of behaviors.parquet (article_ids_clicked)"}
    )
    min_clicks: int = field(
        default=0,
        metadata={"help": "keep users with at least this many clicks (the paper's eb_nerd_512: 512)"},
    )
    keep_engagement: bool = field(
        default=False, metadata={"help": "keep scroll_percentage and read_time as extra interaction columns"}
    )
    articles: str | None = field(
        default=None, metadata={"help": "articles.parquet (default: next to the split folders, if present)"}
    )


@dataclass(frozen=True)
class EbnerdFiles:
    history: Path
    behaviors: Path | None
    articles: Path | None


def locate(path: Path, options: EbnerdOptions) -> EbnerdFiles:
    """Find history / behaviors / articles from a release folder, a split folder or a history file."""
    path = Path(path).expanduser()
    if path.is_file():
        history = path
    elif (path / options.split / "history.parquet").is_file():
        history = path / options.split / "history.parquet"
    elif (path / "history.parquet").is_file():
        history = path / "history.parquet"
    elif path.is_dir():
        raise FileNotFoundError(
            f"{path}: no history.parquet (ebnerd expects <release>/{options.split}/history.parquet, "
            "a split folder holding history.parquet, or the file itself)"
        )
    else:
        raise FileNotFoundError(f"{path}: no such file or directory (ebnerd input)")
    behaviors = None
    if options.behaviors:
        behaviors = history.parent / "behaviors.parquet"
        if not behaviors.is_file():
            raise FileNotFoundError(f"{behaviors}: no such file (ebnerd behaviors=true reads it)")
    if options.articles is not None:
        articles: Path | None = Path(options.articles).expanduser()
        if not articles.is_file():
            raise FileNotFoundError(f"{articles}: no such file (ebnerd articles)")
    else:
        near = [history.parent / "articles.parquet", history.parent.parent / "articles.parquet"]
        articles = next((p for p in near if p.is_file()), None)
    return EbnerdFiles(history, behaviors, articles)


def input_files(path: Path, options: EbnerdOptions) -> list[Path]:
    files = locate(path, options)
    return [p for p in (files.history, files.behaviors, files.articles) if p is not None]


def _check_list(path: Path, schema: pa.Schema, column: str) -> pa.DataType:
    dtype = schema.field(column).type
    if not (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)):
        raise DataValidationError(
            f"{path}: column '{column}' is {dtype}, expected a list (EB-NeRD history.parquet has one row per "
            "user with list columns)"
        )
    return dtype.value_type


def _history_sql(path: Path, options: EbnerdOptions) -> str:
    schema = parquet_schema(path, "ebnerd history")
    require_columns(path, schema.names, HISTORY_COLUMNS, "an EB-NeRD history.parquet")
    item_t = _check_list(path, schema, "article_id_fixed")
    time_t = _check_list(path, schema, "impression_time_fixed")
    if not pa.types.is_integer(item_t):
        raise DataValidationError(f"{path}: article_id_fixed holds {item_t}, expected integer article ids")
    extras = {}
    if options.keep_engagement:
        require_columns(path, schema.names, list(ENGAGEMENT_COLUMNS), "ebnerd keep_engagement")
        extras = ENGAGEMENT_COLUMNS
    lists = ", ".join(
        f"unnest({ident(c)}) AS {ident(c)}" for c in ["article_id_fixed", "impression_time_fixed", *extras]
    )
    extra_out = "".join(f", CAST({ident(src)} AS FLOAT) AS {ident(dst)}" for src, dst in extras.items())
    return (
        f"SELECT CAST(user_id AS BIGINT) AS user_id, CAST(article_id_fixed AS BIGINT) AS item_id, "
        f"{epoch_seconds_sql(ident('impression_time_fixed'), time_t)} AS timestamp{extra_out} "
        f"FROM (SELECT user_id, {lists} FROM read_parquet({sql_path(path)})) "
        "WHERE article_id_fixed IS NOT NULL AND impression_time_fixed IS NOT NULL"
    )


def _behaviors_sql(path: Path, options: EbnerdOptions) -> str:
    schema = parquet_schema(path, "ebnerd behaviors")
    require_columns(path, schema.names, BEHAVIOR_COLUMNS, "an EB-NeRD behaviors.parquet")
    _check_list(path, schema, "article_ids_clicked")
    time_sql = epoch_seconds_sql("impression_time", schema.field("impression_time").type)
    extra = ", CAST(NULL AS FLOAT) AS scroll_percentage, CAST(NULL AS FLOAT) AS read_time"
    return (
        f"SELECT CAST(user_id AS BIGINT) AS user_id, CAST(clicked AS BIGINT) AS item_id, {time_sql} AS timestamp"
        f"{extra if options.keep_engagement else ''} FROM (SELECT user_id, impression_time, "
        f"unnest(article_ids_clicked) AS clicked FROM read_parquet({sql_path(path)})) "
        "WHERE clicked IS NOT NULL AND impression_time IS NOT NULL AND user_id IS NOT NULL"
    )


def _check_lengths(con: duckdb.DuckDBPyConnection, path: Path, columns: list[str]) -> None:
    lengths = " OR ".join(f"len({ident(c)}) <> len(article_id_fixed)" for c in columns[1:])
    row = fetch_one(con, f"SELECT min(user_id) FROM read_parquet({sql_path(path)}) WHERE {lengths}", path)
    bad = row[0] if row else None
    if bad is not None:
        raise DataValidationError(
            f"{path}: user {bad} has list columns of different lengths ({', '.join(columns)} must be parallel)"
        )


def _articles_sql(path: Path) -> str:
    schema = parquet_schema(path, "ebnerd articles")
    require_columns(path, schema.names, ["article_id"], "an EB-NeRD articles.parquet")
    cols = ["CAST(article_id AS BIGINT) AS item_id"]
    cols += [
        f"{nonempty_text_sql(ident(c))} AS {ident(c)}" for c in ARTICLE_TEXT_COLUMNS if c in schema.names
    ]
    for c in ARTICLE_LIST_COLUMNS:
        if c in schema.names:
            _check_list(path, schema, c)
            cols.append(f"{joined_list_sql(ident(c))} AS {ident(c)}")
    if "published_time" in schema.names:
        cols.append("published_time")
    return f"SELECT {', '.join(cols)} FROM read_parquet({sql_path(path)}) ORDER BY item_id"


def build_ebnerd(path: Path, out_dir: Path, options: EbnerdOptions = EbnerdOptions()) -> BuiltDataset:
    """Write EB-NeRD clicks (and the article table when present) as canonical parquet under ``out_dir``."""
    files = locate(path, options)
    out_dir = Path(out_dir)
    with duck() as con:
        history = _history_sql(files.history, options)
        engagement = list(ENGAGEMENT_COLUMNS) if options.keep_engagement else []
        _check_lengths(con, files.history, ["article_id_fixed", "impression_time_fixed", *engagement])
        sql = (
            history
            if files.behaviors is None
            else f"{history} UNION ALL {_behaviors_sql(files.behaviors, options)}"
        )
        copy_to_parquet(con, sql, out_dir / INTERACTIONS_FILE, files.history)
        items = None
        if files.articles is not None:
            items = out_dir / ITEMS_FILE
            copy_to_parquet(con, _articles_sql(files.articles), items, files.articles)
    return BuiltDataset(
        interactions=out_dir / INTERACTIONS_FILE,
        items=items,
        min_user_interactions=int(options.min_clicks),
        min_item_interactions=0,
        name="ebnerd",
        license_note=EBNERD_LICENSE,
    )

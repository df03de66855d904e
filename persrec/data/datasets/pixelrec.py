"""PixelRec (Pixel200K / Pixel1M / Pixel8M) to canonical parquet, in the layout of the HLLM repository.

Source: PixelRec (Cheng et al., "An Image Dataset for Benchmarking Recommender Systems with Raw Pixels", SDM
2024, https://github.com/westlake-repl/PixelRec), as the HLLM repository's dataset README lays it out::

    <root>/dataset/Pixel200K.csv       item_id,user_id,timestamp           (one row per interaction)
    <root>/information/Pixel200K.csv   item_id,view_number,...,title,tag,description

Licence: research use under the PixelRec terms (non-commercial; cite the paper); the image files are not read.
Publisher's figures (not re-measured here): Pixel200K about 200 k users, 96 k items, 4 M interactions; Pixel1M
about 1 M users, 100 k items, 20 M interactions; Pixel8M about 8.9 M users, 408 k items, 158 M interactions.

Ids are read as text (they are opaque); ``timestamp`` may be epoch seconds or a date-time string. Item table:
``title``, ``tag`` and ``description`` are plain strings (blank text becomes null); the ``*_number`` counters
are kept as integers. The HLLM setup trains on these files unfiltered, so no minimum is recorded.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from persrec.data.datasets.builder_io import (
    copy_to_parquet,
    duck,
    fetch_one,
    first_matching,
    ident,
    nonempty_text_sql,
    read_head_lines,
    require_columns,
    sql_path,
)
from persrec.data.datasets.movielens import INTERACTIONS_FILE, ITEMS_FILE, BuiltDataset
from persrec.data.schema import DataValidationError

PIXELREC_LICENSE = (
    "PixelRec: research use only under the PixelRec terms (non-commercial); cite Cheng et al. (2024)."
)
INTERACTION_COLUMNS = ["item_id", "user_id", "timestamp"]
TEXT_COLUMNS = ["title", "tag", "description"]


@dataclass(frozen=True)
class PixelrecOptions:
    name: str | None = field(
        default=None,
        metadata={"help": "which release under dataset/ (e.g. Pixel200K; default: the first Pixel*.csv)"},
    )
    items: str | None = field(
        default=None, metadata={"help": "item information CSV (default: information/<same file name>)"}
    )


@dataclass(frozen=True)
class PixelrecFiles:
    interactions: Path
    items: Path | None


def locate(path: Path, options: PixelrecOptions) -> PixelrecFiles:
    path = Path(path).expanduser()
    if path.is_file():
        interactions = path
    elif path.is_dir():
        folder = path / "dataset" if (path / "dataset").is_dir() else path
        patterns = [f"{options.name}.csv"] if options.name else ["Pixel*.csv", "*.csv"]
        interactions = first_matching(folder, patterns, "PixelRec interaction CSV")
    else:
        raise FileNotFoundError(f"{path}: no such file or directory (pixelrec input)")
    if options.items is not None:
        items: Path | None = Path(options.items).expanduser()
        if not items.is_file():
            raise FileNotFoundError(f"{items}: no such file (pixelrec item information CSV)")
    else:
        near = interactions.parent.parent / "information" / interactions.name
        items = near if near.is_file() else None
    return PixelrecFiles(interactions, items)


def input_files(path: Path, options: PixelrecOptions) -> list[Path]:
    files = locate(path, options)
    return [p for p in (files.interactions, files.items) if p is not None]


def csv_header(path: Path) -> list[str]:
    lines = read_head_lines(path, 1)
    if not lines:
        raise DataValidationError(f"{path}: file is empty")
    return [c.strip() for c in next(csv.reader([lines[0]]))]


def _time_sql(expr: str) -> str:
    """Epoch seconds from text holding either a number of seconds or a date-time (NULL when neither)."""
    return (
        f"CAST(CASE WHEN regexp_full_match(trim({expr}), '-?[0-9]+(\\.[0-9]*)?') "
        f"THEN floor(CAST(trim({expr}) AS DOUBLE)) "
        f"ELSE floor(epoch_us(TRY_CAST(trim({expr}) AS TIMESTAMP)) / 1000000) END AS BIGINT)"
    )


def _check_times(con, path: Path) -> None:  # noqa: ANN001 - a DuckDB connection
    bad = fetch_one(
        con,
        f"SELECT timestamp FROM read_csv({sql_path(path)}, header=true, all_varchar=true) "
        f"WHERE {_time_sql('timestamp')} IS NULL LIMIT 1",
        path,
    )
    if bad is not None:
        raise DataValidationError(
            f"{path}: timestamp {bad[0]!r} is neither epoch seconds nor a date-time (PixelRec expects item_id,"
            "user_id,timestamp)"
        )


def _items_sql(path: Path, header: list[str]) -> str:
    cols = ["CAST(trim(item_id) AS VARCHAR) AS item_id"]
    for c in header:
        if c.endswith("_number"):
            cols.append(f"TRY_CAST({ident(c)} AS BIGINT) AS {ident(c)}")
        elif c in TEXT_COLUMNS:
            cols.append(f"{nonempty_text_sql(ident(c))} AS {ident(c)}")
    return f"SELECT {', '.join(cols)} FROM read_csv({sql_path(path)}, header=true, all_varchar=true) ORDER BY item_id"


def build_pixelrec(path: Path, out_dir: Path, options: PixelrecOptions = PixelrecOptions()) -> BuiltDataset:
    """Write PixelRec interactions (and the item information, when found) as canonical parquet."""
    files = locate(path, options)
    out_dir = Path(out_dir)
    header = csv_header(files.interactions)
    require_columns(
        files.interactions, header, INTERACTION_COLUMNS, "a PixelRec interaction CSV (with header)"
    )
    items = None
    with duck() as con:
        _check_times(con, files.interactions)
        sql = (
            "SELECT trim(user_id) AS user_id, trim(item_id) AS item_id, "
            f"{_time_sql('timestamp')} AS timestamp "
            f"FROM read_csv({sql_path(files.interactions)}, header=true, all_varchar=true) "
            "WHERE user_id IS NOT NULL AND item_id IS NOT NULL"
        )
        copy_to_parquet(con, sql, out_dir / INTERACTIONS_FILE, files.interactions)
        if files.items is not None:
            item_header = csv_header(files.items)
            require_columns(files.items, item_header, ["item_id"], "a PixelRec item information CSV")
            items = out_dir / ITEMS_FILE
            copy_to_parquet(con, _items_sql(files.items, item_header), items, files.items)
    return BuiltDataset(
        interactions=out_dir / INTERACTIONS_FILE,
        items=items,
        min_user_interactions=0,
        min_item_interactions=0,
        name="pixelrec",
        license_note=PIXELREC_LICENSE,
    )

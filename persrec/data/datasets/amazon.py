"""Amazon product reviews (McAuley lab, UCSD) to canonical parquet: the 2014 and 2018 rating files with item text.

Source: https://cseweb.ucsd.edu/~jmcauley/datasets/amazon/links.html (2014, He & McAuley, WWW 2016) and
https://nijianmo.github.io/amazon/ (2018, Ni, Li & McAuley, EMNLP 2019). Licence: distributed by the McAuley lab
for research; no redistribution licence comes with the files. Layouts, detected from the file names:

* **2014**: ``ratings_<Category>.csv`` without a header, columns ``user,item,rating,timestamp``, and
  ``meta_<Category>.json.gz`` with one Python literal dict per line (read by :mod:`amazon_meta`, never ``eval``);
* **2018**: ``<Category>.csv`` without a header, columns ``item,user,rating,timestamp`` (item first), and
  ``meta_<Category>.json.gz`` as JSON lines;
* **processed** (SeqRecBenchmark copies, as in ``shared/data/amazon-text``): ``interactions.csv.gz`` with header
  ``user_id,item_id,timestamp`` and ``items.csv.gz`` with ``item_id,title``; already filtered.

Item table: ``title``, ``description``, ``categories`` (category paths flattened and joined with ``", "``) and
``brand``, all plain strings with HTML entities unescaped. ``rating`` is kept as an extra interaction column.

Filters (``five_core``): ``iterative`` records a 5/5 minimum that ``prepare`` applies until stable (a true
5-core, the HLLM setup); ``single`` drops items with fewer than 5 ratings and then users with fewer than 5 of the
rest, once, in the builder (the one-pass filter some published preprocessing uses); ``none`` keeps everything.
Publisher's figures, 2014 Books ratings-only: 8.0 M users, 2.3 M items, 22.5 M ratings; measured on the processed
copies in shared/data: Toys 19,124 users / 11,758 items / 165,247 interactions, Health 38,329 / 18,427 / 343,831.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from persrec.config import ConfigError
from persrec.data.datasets.amazon_meta import clean_text, write_meta_parquet
from persrec.data.datasets.builder_io import (
    copy_to_parquet,
    duck,
    read_head_lines,
    require_columns,
    sql_path,
)
from persrec.data.datasets.movielens import INTERACTIONS_FILE, ITEMS_FILE, BuiltDataset
from persrec.data.schema import DataValidationError

AMAZON_LICENSE = (
    "Amazon review data (McAuley lab, UCSD): research use; no redistribution licence comes with the files; "
    "cite He & McAuley (2016) / Ni, Li & McAuley (2019)."
)
VERSIONS = ("auto", "2014", "2018", "processed")
CORE_MODES = ("none", "iterative", "single")
RATING_COLUMNS = {
    "2014": ["user", "item", "rating", "timestamp"],
    "2018": ["item", "user", "rating", "timestamp"],
}
PROCESSED_FILES = ("interactions.csv.gz", "items.csv.gz")


@dataclass(frozen=True)
class AmazonOptions:
    version: str = field(default="auto", metadata={"help": f"file layout: {', '.join(VERSIONS)}"})
    category: str | None = field(
        default=None,
        metadata={"help": "category name of ratings_<C>.csv / <C>.csv when a folder holds several"},
    )
    meta: str | None = field(
        default=None, metadata={"help": "meta file (default: meta_<Category>.json.gz beside)"}
    )
    five_core: str = field(default="none", metadata={"help": f"5-core filter: {', '.join(CORE_MODES)}"})

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ConfigError(f"--version {self.version!r}: expected one of {', '.join(VERSIONS)}")
        if self.five_core not in CORE_MODES:
            raise ConfigError(f"--five_core {self.five_core!r}: expected one of {', '.join(CORE_MODES)}")


@dataclass(frozen=True)
class AmazonFiles:
    version: str
    ratings: Path
    meta: Path | None


def _version_of(ratings: Path) -> str:
    if ratings.name.startswith("ratings_"):
        return "2014"
    if ratings.name.startswith("interactions.csv"):
        return "processed"
    return "2018"


def _category_of(ratings: Path) -> str:
    return ratings.name.removeprefix("ratings_").split(".")[0]


def locate(path: Path, options: AmazonOptions) -> AmazonFiles:
    path = Path(path).expanduser()
    if path.is_file():
        ratings = path
    elif path.is_dir():
        if all((path / f).is_file() for f in PROCESSED_FILES) and options.version in ("auto", "processed"):
            ratings = path / PROCESSED_FILES[0]
        else:
            cat = options.category or "*"
            found = sorted(path.glob(f"ratings_{cat}.csv*")) + sorted(
                p for p in path.glob(f"{cat}.csv*") if not p.name.startswith(("ratings_", "meta_"))
            )
            if options.version in ("2014", "2018"):
                found = [p for p in found if _version_of(p) == options.version]
            if not found:
                raise FileNotFoundError(
                    f"{path}: no Amazon rating file (amazon-reviews expects ratings_<Category>.csv (2014), "
                    f"<Category>.csv (2018) or {' + '.join(PROCESSED_FILES)})"
                )
            if len(found) > 1 and options.category is None:
                names = ", ".join(p.name for p in found)
                raise ConfigError(f"--category: {path} holds several rating files ({names}); choose one")
            ratings = found[0]
    else:
        raise FileNotFoundError(f"{path}: no such file or directory (amazon-reviews input)")
    version = options.version if options.version != "auto" else _version_of(ratings)
    if options.meta is not None:
        meta: Path | None = Path(options.meta).expanduser()
        if not meta.is_file():
            raise FileNotFoundError(f"{meta}: no such file (amazon-reviews meta)")
    elif version == "processed":
        meta = ratings.parent / PROCESSED_FILES[1]
        meta = meta if meta.is_file() else None
    else:
        near = sorted(ratings.parent.glob(f"meta_{_category_of(ratings)}.json*"))
        meta = near[0] if near else None
    return AmazonFiles(version, ratings, meta)


def input_files(path: Path, options: AmazonOptions) -> list[Path]:
    files = locate(path, options)
    return [p for p in (files.ratings, files.meta) if p is not None]


def _check_ratings_head(path: Path, version: str) -> None:
    """Header-less ``a,b,rating,timestamp`` lines; a header or other column count is named, not guessed."""
    names = RATING_COLUMNS[version]
    lines = read_head_lines(path, 3)
    if not lines:
        raise DataValidationError(f"{path}: file is empty")
    for row in csv.reader(lines):
        ok = len(row) == 4
        try:
            float(row[2])
            int(row[3])
        except (ValueError, IndexError):
            ok = False
        if not ok:
            raise DataValidationError(
                f"{path}: line {row!r} is not {','.join(names)} (Amazon {version} rating files have no header "
                "and four columns: a rating number and an integer unix timestamp)"
            )


def _ratings_sql(files: AmazonFiles) -> str:
    if files.version == "processed":
        header = next(csv.reader(read_head_lines(files.ratings, 1)), [])
        require_columns(
            files.ratings, header, ["user_id", "item_id", "timestamp"], "a processed interactions.csv.gz"
        )
        return (
            "SELECT CAST(user_id AS VARCHAR) AS user_id, CAST(item_id AS VARCHAR) AS item_id, "
            f"CAST(timestamp AS BIGINT) AS timestamp FROM read_csv({sql_path(files.ratings)}, header=true, "
            "columns={'user_id': 'VARCHAR', 'item_id': 'VARCHAR', 'timestamp': 'BIGINT'})"
        )
    _check_ratings_head(files.ratings, files.version)
    columns = ", ".join(
        f"'{c}': '{'DOUBLE' if c == 'rating' else 'BIGINT' if c == 'timestamp' else 'VARCHAR'}'"
        for c in RATING_COLUMNS[files.version]
    )
    return (
        "SELECT user AS user_id, item AS item_id, timestamp, CAST(rating AS FLOAT) AS rating "
        f"FROM read_csv({sql_path(files.ratings)}, header=false, delim=',', quote='\"', columns={{{columns}}})"
    )


def _write_single_pass(con, sql: str, out: Path, source: Path, k: int = 5) -> None:  # noqa: ANN001 - a DuckDB connection
    """One pass: items with fewer than ``k`` ratings go, then users with fewer than ``k`` of the rest.

    The ratings are staged to parquet first so that the filtered rows can be put back in file order (the
    tie-break ``prepare`` uses for equal timestamps) whatever order the joins produce."""
    staged = out.with_name(f".{out.name}.all")
    try:
        copy_to_parquet(con, sql, staged, source)
        r = f"read_parquet({sql_path(staged)}, file_row_number=true)"
        copy_to_parquet(
            con,
            f"WITH r AS (SELECT * FROM {r}), "
            f"ki AS (SELECT item_id FROM r GROUP BY item_id HAVING count(*) >= {k}), "
            "r2 AS (SELECT r.* FROM r SEMI JOIN ki USING (item_id)), "
            f"ku AS (SELECT user_id FROM r2 GROUP BY user_id HAVING count(*) >= {k}) "
            "SELECT * EXCLUDE (file_row_number) FROM r2 SEMI JOIN ku USING (user_id) ORDER BY file_row_number",
            out,
            source,
        )
    finally:
        staged.unlink(missing_ok=True)


def _clean_title(text: str | None) -> str | None:
    return clean_text(text)


def _processed_items(con, path: Path, out: Path) -> None:  # noqa: ANN001 - a DuckDB connection
    header = next(csv.reader(read_head_lines(path, 1)), [])
    require_columns(path, header, ["item_id", "title"], "a processed items.csv.gz")
    con.create_function("persrec_clean_text", _clean_title, ["VARCHAR"], "VARCHAR")
    copy_to_parquet(
        con,
        "SELECT item_id, persrec_clean_text(title) AS title FROM read_csv("
        f"{sql_path(path)}, header=true, columns={{'item_id': 'VARCHAR', 'title': 'VARCHAR'}}) ORDER BY item_id",
        out,
        path,
    )


def build_amazon(path: Path, out_dir: Path, options: AmazonOptions = AmazonOptions()) -> BuiltDataset:
    """Write Amazon ratings (and the meta item table, when found) as canonical parquet under ``out_dir``."""
    files = locate(path, options)
    out_dir = Path(out_dir)
    sql = _ratings_sql(files)
    items = None
    with duck() as con:
        if options.five_core == "single":
            _write_single_pass(con, sql, out_dir / INTERACTIONS_FILE, files.ratings)
        else:
            copy_to_parquet(con, sql, out_dir / INTERACTIONS_FILE, files.ratings)
        if files.meta is not None:
            items = out_dir / ITEMS_FILE
            if files.version == "processed":
                _processed_items(con, files.meta, items)
            else:
                write_meta_parquet(files.meta, items)
    core = 5 if options.five_core == "iterative" else 0
    return BuiltDataset(
        interactions=out_dir / INTERACTIONS_FILE,
        items=items,
        min_user_interactions=core,
        min_item_interactions=core,
        name="amazon-reviews",
        license_note=AMAZON_LICENSE,
    )

"""DuckDB side of ``prepare``: stage the input, validate it, k-core filter it and assign dense ids.

Everything here runs as SQL under DuckDB's memory limit and spill directory, so inputs larger than
RAM never pass through Python. The steps communicate through tables in the connection, which the
writers then read:

* ``stage_raw`` creates ``raw(u, i, t, seq[, pos])``: one row per interaction with a global input
  ordinal ``seq`` (and the list position ``pos`` for the per-user layout) used for tie-breaks.
* ``drop_duplicates`` (optional) rewrites ``raw`` keeping the first of each repeated (u, i, t).
* ``kcore`` creates ``vu(u, c)`` and ``vi(i, c)``: the surviving users/items with their counts.
* ``assign_ids`` creates ``users(u, c, user_idx)`` and ``items(i, c, item_idx)``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from persrec.data.schema import (
    DataValidationError,
    InputSchema,
    ResolvedColumns,
    validate_interactions_file,
)

_MAX_ITEMS = np.iinfo(np.int32).max


# --------------------------------------------------------------------------------------------- sql text


def quote_ident(name: str) -> str:
    """SQL identifier for a column name that may contain quotes or spaces."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """SQL string literal (paths, settings) with embedded quotes escaped."""
    return "'" + value.replace("'", "''") + "'"


def id_cast(kind: str, expr: str) -> str:
    """Cast an id expression to the one SQL type used for its kind, so joins across files agree."""
    return f"CAST({expr} AS {'BIGINT' if kind == 'int' else 'VARCHAR'})"


def _time_cast(kind: str, expr: str, unit: str | None) -> str:
    # Sort key at full input precision: ints as-is, floats as doubles, timestamps in microseconds
    # (nanosecond inputs are truncated, so ties below 1us fall back to input order).
    if kind == "int":
        return f"CAST({expr} AS BIGINT)"
    if kind == "float":
        return f"CAST({expr} AS DOUBLE)"
    return f"epoch_us(CAST({expr} AS {'TIMESTAMP_NS' if unit == 'ns' else 'TIMESTAMP'}))"


def file_names(files: list[Path], limit: int = 3) -> str:
    """File list for error messages, shortened when long."""
    shown = ", ".join(map(str, files[:limit]))
    return shown + (f" (and {len(files) - limit} more)" if len(files) > limit else "")


# --------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """Non-empty input files with their global row offsets (for error locations and tie-breaks)."""

    files: list[Path]
    starts: list[int]
    cols: ResolvedColumns
    time_units: list[str | None]

    def locate(self, seq: int) -> tuple[Path, int]:
        k = bisect.bisect_right(self.starts, seq) - 1
        return self.files[k], seq - self.starts[k]


def _time_unit(f: Path, cols: ResolvedColumns) -> str | None:
    t = pq.ParquetFile(f).schema_arrow.field(cols.time_col).type
    t = t.value_type if cols.layout == "per_user" else t
    return t.unit if pa.types.is_timestamp(t) else None


def validate_sources(files: list[Path], schema: InputSchema) -> Source:
    """Check every file's schema up front and require all files to agree before any SQL runs."""
    kept: list[Path] = []
    starts: list[int] = []
    units: list[str | None] = []
    cols: ResolvedColumns | None = None
    total = 0
    for f in files:
        found = validate_interactions_file(f, schema, allow_empty=len(files) > 1)
        rows = pq.ParquetFile(f).metadata.num_rows
        if rows == 0:
            continue  # empty parts of a multi-file dataset carry nothing
        if cols is None:
            cols = found
        elif found != cols:
            raise DataValidationError(
                f"{f}: columns or types differ from {kept[0]} ({found} vs {cols}); all input files must agree"
            )
        kept.append(f)
        starts.append(total)
        units.append(_time_unit(f, found))
        total += rows
    if cols is None:
        raise DataValidationError(f"{file_names(files)}: input has no rows")
    return Source(kept, starts, cols, units)


def _source_sql(src: Source) -> str:
    """UNION ALL over the files, staging (u, i, t, seq[, pos]) with a global input row ordinal."""
    c = src.cols
    parts = []
    for f, start, unit in zip(src.files, src.starts, src.time_units, strict=True):
        scan = f"read_parquet({quote_literal(str(f))}, file_row_number=true)"
        if c.layout == "interactions":
            parts.append(
                f"SELECT {id_cast(c.user_kind, quote_ident(c.user_col))} AS u, "
                f"{id_cast(c.item_kind, quote_ident(c.item_col))} AS i, "
                f"{_time_cast(c.time_kind, quote_ident(c.time_col), unit)} AS t, "
                f"file_row_number + {start} AS seq FROM {scan}"
            )
        else:
            parts.append(
                f"SELECT {id_cast(c.user_kind, 'u')} AS u, {id_cast(c.item_kind, 'i')} AS i, "
                f"{_time_cast(c.time_kind, 't', unit)} AS t, seq, CAST(pos AS INTEGER) AS pos FROM ("
                f"SELECT {quote_ident(c.user_col)} AS u, UNNEST({quote_ident(c.item_col)}) AS i, "
                f"UNNEST({quote_ident(c.time_col)}) AS t, UNNEST(range(len({quote_ident(c.item_col)}))) AS pos, "
                f"file_row_number + {start} AS seq FROM {scan})"
            )
    return " UNION ALL ".join(parts)


# --------------------------------------------------------------------------------------------- steps


@contextmanager
def connect(work: Path, memory_limit: str, threads: int) -> Iterator[duckdb.DuckDBPyConnection]:
    """On-disk database under ``work`` with bounded memory, spilling to ``work/spill``."""
    spill = work / "spill"
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(work / "prepare.duckdb"))
    try:
        con.execute(f"SET memory_limit={quote_literal(memory_limit)}")
        con.execute(f"SET threads={int(threads)}")
        con.execute(f"SET temp_directory={quote_literal(str(spill))}")
        con.execute("SET preserve_insertion_order=false")  # every ordered result below has ORDER BY
        con.execute("SET TimeZone='UTC'")  # zone-aware timestamps become UTC epoch values
        yield con
    finally:
        con.close()


def _check_lists(con: duckdb.DuckDBPyConnection, src: Source) -> None:
    """Per-user layout: every row needs a user and two non-null lists of equal length."""
    c = src.cols
    union = " UNION ALL ".join(
        f"SELECT {quote_ident(c.user_col)} AS u, {quote_ident(c.item_col)} AS o, {quote_ident(c.time_col)} AS tl, "
        f"file_row_number + {start} AS seq FROM read_parquet({quote_literal(str(f))}, file_row_number=true)"
        for f, start in zip(src.files, src.starts, strict=True)
    )
    null_user, null_list, mismatch = con.execute(
        "SELECT min(seq) FILTER (WHERE u IS NULL), min(seq) FILTER (WHERE o IS NULL OR tl IS NULL), "
        f"min(seq) FILTER (WHERE len(o) <> len(tl)) FROM ({union})"
    ).fetchone()
    if null_user is not None:
        f, row = src.locate(null_user)
        raise DataValidationError(
            f"{f}: column '{c.user_col}' is null at row {row}; user ids must not be null"
        )
    if null_list is not None:
        f, row = src.locate(null_list)
        raise DataValidationError(
            f"{f}: column '{c.item_col}' or '{c.time_col}' is null at row {row}; use an empty list instead"
        )
    if mismatch is not None:
        f, row = src.locate(mismatch)
        user, n_items, n_times = con.execute(
            f"SELECT {quote_ident(c.user_col)}, len({quote_ident(c.item_col)}), len({quote_ident(c.time_col)}) "
            f"FROM read_parquet({quote_literal(str(f))}, file_row_number=true) WHERE file_row_number = {row}"
        ).fetchone()
        raise DataValidationError(
            f"{f}: row {row} (user {user!r}): column '{c.item_col}' has {n_items} element(s) but "
            f"'{c.time_col}' has {n_times}; the lists must have equal length"
        )


# Errors in persrec's own SQL (or an interrupt), not in the data being read.
_NOT_READ_ERRORS = (
    duckdb.OutOfMemoryException,
    duckdb.ParserException,
    duckdb.BinderException,
    duckdb.CatalogException,
    duckdb.InterruptException,
)


@contextmanager
def reading(con: duckdb.DuckDBPyConnection, files: list[Path]) -> Iterator[None]:
    """Turn DuckDB's failures to decode ``files`` into one error naming the unreadable file.

    A file whose footer is intact but whose pages are damaged passes the footer checks and only
    fails here, deep inside a scan, with a message that may not name the file.
    """
    try:
        yield
    except duckdb.Error as exc:
        if isinstance(exc, _NOT_READ_ERRORS):
            raise
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        bad = _unreadable_file(con, files, str(exc))
        if bad is None:
            raise DataValidationError(f"{file_names(files)}: could not read the input ({detail})") from exc
        detail = detail.replace(f'Failed to read file "{bad}": ', "")
        raise DataValidationError(
            f"{bad}: not a readable parquet file ({detail}); it may be corrupt or truncated"
        ) from exc


def _unreadable_file(con: duckdb.DuckDBPyConnection, files: list[Path], message: str) -> Path | None:
    """The file DuckDB failed on: named in its message, else the first one that fails a full read."""
    named = [f for f in files if str(f) in message]
    if named:
        return max(named, key=lambda f: len(str(f)))  # '/a/x.parquet' also matches '/a/x.parquet.1'
    if len(files) == 1:
        return files[0]
    for f in files:  # only on the error path: decode every value of every column, file by file
        try:
            con.execute(f"SELECT max(hash(COLUMNS(*))) FROM read_parquet({quote_literal(str(f))})").fetchall()
        except duckdb.Error:
            return f
    return None


def count_duplicates(con: duckdb.DuckDBPyConnection) -> int:
    """Rows of ``raw`` repeating an earlier (u, i, t): the number ``drop_duplicates`` removes."""
    return int(
        con.execute(
            "SELECT coalesce(sum(c - 1), 0) FROM (SELECT count(*) AS c FROM raw GROUP BY u, i, t HAVING c > 1)"
        ).fetchone()[0]
    )


def drop_duplicates(con: duckdb.DuckDBPyConnection, layout: str) -> None:
    """Keep the first of each repeated (u, i, t) in input order, so tie-breaks stay the same.

    A grouped aggregate (not a window) so DuckDB can spill it to disk like the other steps.
    """
    if layout == "per_user":
        first = "min({'seq': seq, 'pos': pos}) AS f"
        keep = "u, i, t, f.seq AS seq, f.pos AS pos"
    else:
        first = "min(seq) AS f"
        keep = "u, i, t, f AS seq"
    con.execute(
        f"CREATE OR REPLACE TABLE raw AS SELECT {keep} FROM (SELECT u, i, t, {first} FROM raw GROUP BY u, i, t)"
    )


def stage_raw(con: duckdb.DuckDBPyConnection, src: Source) -> None:
    """Create ``raw``; per-user lists are checked first so a bad row is reported by file and row."""
    if src.cols.layout == "per_user":
        _check_lists(con, src)
    try:
        con.execute(f"CREATE TABLE raw AS {_source_sql(src)}")
    except duckdb.ConversionException as exc:
        raise DataValidationError(f"{file_names(src.files)}: {exc}") from exc


def check_staged(con: duckdb.DuckDBPyConnection, src: Source) -> None:
    """Full-scan checks the parquet statistics cannot guarantee: nulls, negative ids, non-finite times."""
    c = src.cols
    element = " (list element)" if c.layout == "per_user" else ""
    checks: list[tuple[str, str]] = [
        ("u IS NULL", f"column '{c.user_col}' has null user ids"),
        ("i IS NULL", f"column '{c.item_col}'{element} has null item ids"),
        ("t IS NULL", f"column '{c.time_col}'{element} has null timestamps"),
    ]
    if c.user_kind == "int":
        checks.append(("u < 0", f"column '{c.user_col}' has negative user ids; integer ids must be >= 0"))
    if c.item_kind == "int":
        checks.append(
            ("i < 0", f"column '{c.item_col}'{element} has negative item ids; integer ids must be >= 0")
        )
    if c.time_kind == "float":
        checks.append(
            (
                "isnan(t) OR isinf(t) OR abs(t) >= 9.2e18",
                f"column '{c.time_col}'{element} has non-finite or out-of-range timestamps",
            )
        )
    select = ", ".join(
        f"count(*) FILTER (WHERE {cond}), min(seq) FILTER (WHERE {cond})" for cond, _ in checks
    )
    result = con.execute(f"SELECT {select} FROM raw").fetchone()
    for k, (_, what) in enumerate(checks):
        count, first = result[2 * k], result[2 * k + 1]
        if count:
            f, row = src.locate(first)
            raise DataValidationError(f"{f}: {what} ({count} in total, first at row {row})")


def kcore(
    con: duckdb.DuckDBPyConnection,
    min_user: int,
    min_item: int,
    on_round: Callable[[int, int, int], None],
) -> int:
    """Build ``vu(u, c)`` and ``vi(i, c)``: users/items of the k-core with their final counts."""

    def count(where: str) -> None:
        con.execute(
            f"CREATE OR REPLACE TABLE cnt AS SELECT u, i, count(*) AS c FROM raw {where} GROUP BY GROUPING SETS ((u), (i))"
        )
        con.execute("CREATE OR REPLACE TABLE vu AS SELECT u, c FROM cnt WHERE u IS NOT NULL")
        con.execute("CREATE OR REPLACE TABLE vi AS SELECT i, c FROM cnt WHERE i IS NOT NULL")
        con.execute("DROP TABLE cnt")

    count("")
    rounds = 0
    while True:
        drop_u = con.execute(f"SELECT count(*) FROM vu WHERE c < {int(min_user)}").fetchone()[0]
        drop_i = con.execute(f"SELECT count(*) FROM vi WHERE c < {int(min_item)}").fetchone()[0]
        if not drop_u and not drop_i:
            return rounds
        rounds += 1
        on_round(rounds, drop_u, drop_i)
        con.execute(f"DELETE FROM vu WHERE c < {int(min_user)}")
        con.execute(f"DELETE FROM vi WHERE c < {int(min_item)}")
        count("WHERE u IN (SELECT u FROM vu) AND i IN (SELECT i FROM vi)")


@dataclass(frozen=True)
class Counts:
    users: int
    items: int
    interactions: int


def assign_ids(con: duckdb.DuckDBPyConnection, src: Source, min_user: int, min_item: int) -> Counts:
    """Dense indices in original-id order: users 0..U-1, items 1..N (0 stays free for padding).

    The thresholds are only needed to explain an empty result.
    """
    con.execute(
        "CREATE TABLE users AS SELECT u, c, CAST(row_number() OVER (ORDER BY u) - 1 AS INTEGER) AS user_idx FROM vu"
    )
    users, interactions = con.execute("SELECT count(*), coalesce(sum(c), 0) FROM users").fetchone()
    items = con.execute("SELECT count(*) FROM vi").fetchone()[0]
    if interactions == 0:
        raise DataValidationError(
            f"{file_names(src.files)}: no interactions left after filtering with "
            f"min_user_interactions={min_user}, "
            f"min_item_interactions={min_item}"
        )
    if items > _MAX_ITEMS:
        raise DataValidationError(
            f"{file_names(src.files)}: {items} distinct items exceed the int32 index range"
        )
    con.execute(
        "CREATE TABLE items AS SELECT i, c, CAST(row_number() OVER (ORDER BY i) AS INTEGER) AS item_idx FROM vi"
    )
    return Counts(int(users), int(items), int(interactions))

"""Shared pieces of the streaming dataset builders: a bounded DuckDB connection, input checks that name what a
format expects, and atomic parquet output of a SQL query.

Builders run their heavy work as DuckDB SQL over the raw files, so inputs far larger than memory stream through
(DuckDB spills to a temporary directory). ``preserve_insertion_order`` stays on: the canonical interactions keep
the source order, which is the tie-break ``prepare`` applies to equal timestamps.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from persrec.atomic import atomic_path
from persrec.data.schema import DataValidationError
from persrec.data.staging import quote_ident, quote_literal


@contextmanager
def duck(memory_limit: str = "3GB", threads: int = 2) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB with a memory limit and its own spill directory (removed afterwards)."""
    spill = Path(tempfile.mkdtemp(prefix="persrec-build-"))
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"SET memory_limit={quote_literal(memory_limit)}")
        con.execute(f"SET threads={int(threads)}")
        con.execute(f"SET temp_directory={quote_literal(str(spill))}")
        con.execute("SET TimeZone='UTC'")
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def sql_path(path: Path) -> str:
    return quote_literal(str(path))


def sql_paths(paths: Sequence[Path]) -> str:
    return "[" + ", ".join(sql_path(p) for p in paths) + "]"


def parquet_schema(path: Path, fmt: str) -> pa.Schema:
    """The arrow schema of a parquet file, or an error saying the format expected parquet there."""
    try:
        return pq.ParquetFile(path).schema_arrow
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataValidationError(
            f"{path}: not a readable parquet file ({fmt} expects parquet here): {exc}"
        ) from exc


def require_columns(path: Path, available: Sequence[str], needed: Sequence[str], what: str) -> None:
    """Fail listing every missing column, what the format expects and what the file has instead."""
    missing = [c for c in needed if c not in available]
    if missing:
        raise DataValidationError(
            f"{path}: missing column(s) {', '.join(missing)}; {what} needs {', '.join(needed)} "
            f"(the file has: {', '.join(available) or 'no columns'})"
        )


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    return path


def first_matching(directory: Path, patterns: Sequence[str], what: str) -> Path:
    """The first file of ``directory`` matching one of ``patterns`` (in pattern order, then by name)."""
    for pattern in patterns:
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
        if found:
            return found[0]
    raise FileNotFoundError(f"{directory}: no {what} found (looked for {', '.join(patterns)})")


def read_head_lines(path: Path, count: int = 3) -> list[str]:
    """The first non-empty lines of a text file, gzip or not, for format sniffing and error messages."""
    opener = gzip.open if path.suffix == ".gz" else open
    lines: list[str] = []
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    lines.append(line.rstrip("\r\n"))
                if len(lines) >= count:
                    break
    except (OSError, EOFError) as exc:
        raise DataValidationError(f"{path}: cannot read it as text ({exc})") from exc
    return lines


def epoch_seconds_sql(expr: str, dtype: pa.DataType) -> str:
    """SQL turning a time column into BIGINT epoch seconds (timestamps floored, numbers taken as seconds)."""
    if pa.types.is_integer(dtype):
        return f"CAST({expr} AS BIGINT)"
    if pa.types.is_floating(dtype):
        return f"CAST(floor({expr}) AS BIGINT)"
    if pa.types.is_timestamp(dtype) or pa.types.is_date(dtype):
        return f"CAST(floor(epoch_us(CAST({expr} AS TIMESTAMP)) / 1000000) AS BIGINT)"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return f"CAST(floor(epoch_us(CAST({expr} AS TIMESTAMP)) / 1000000) AS BIGINT)"
    raise TypeError(f"unsupported time type {dtype}")


def is_time_type(dtype: pa.DataType) -> bool:
    return any(
        check(dtype)
        for check in (
            pa.types.is_integer,
            pa.types.is_floating,
            pa.types.is_timestamp,
            pa.types.is_date,
            pa.types.is_string,
            pa.types.is_large_string,
        )
    )


def copy_to_parquet(con: duckdb.DuckDBPyConnection, sql: str, path: Path, source: object) -> int:
    """Write the rows of ``sql`` to ``path`` atomically (zstd parquet); returns the row count.

    A row DuckDB cannot read or convert (a bad number deep in a CSV, a damaged parquet page) becomes a
    ``DataValidationError`` naming ``source`` and DuckDB's description of the row, not a traceback."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            con.execute(f"COPY ({sql}) TO {sql_path(tmp)} (FORMAT parquet, COMPRESSION zstd)")
    except duckdb.OutOfMemoryException as exc:
        raise MemoryError(f"building from {source} ran out of memory ({exc}); raise --memory_limit") from exc
    except duckdb.Error as exc:
        detail = " ".join(str(exc).split())
        raise DataValidationError(f"{source}: cannot read it ({detail[:400]})") from exc
    return int(pq.ParquetFile(path).metadata.num_rows)


def fetch_one(con: duckdb.DuckDBPyConnection, sql: str, source: object) -> tuple[object, ...] | None:
    """First row of a check query; a file DuckDB cannot read is named as in :func:`copy_to_parquet`."""
    try:
        return con.execute(sql).fetchone()
    except duckdb.Error as exc:
        detail = " ".join(str(exc).split())
        raise DataValidationError(f"{source}: cannot read it ({detail[:400]})") from exc


def ident(name: str) -> str:
    return quote_ident(name)


def nonempty_text_sql(expr: str) -> str:
    """NULL for missing or blank text, the trimmed text otherwise (so text coverage counts real text)."""
    return f"NULLIF(trim(CAST({expr} AS VARCHAR)), '')"


def joined_list_sql(expr: str, separator: str = ", ") -> str:
    """A list of strings as one string (blank elements dropped), NULL for a missing or empty list."""
    return (
        f"NULLIF(array_to_string(list_filter(list_transform({expr}, lambda x: trim(CAST(x AS VARCHAR))), "
        f"lambda x: x <> ''), {quote_literal(separator)}), '')"
    )

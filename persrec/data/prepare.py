"""Out-of-core ``prepare``: raw interaction parquet -> validated, filtered, memory-mapped CSR store.

All heavy lifting runs inside DuckDB with a memory limit and a spill directory, so inputs far
larger than RAM are handled; Python only streams the final sorted rows into ``.npy`` files.

Decisions worth knowing:

* Dense item indices 1..N follow the sort order of the original item id (numeric for integer
  ids, byte-wise for strings); user indices 0..U-1 follow the original user id. Both are
  deterministic and independent of file order.
* Each history is sorted by timestamp; equal timestamps keep input order (file order, then row
  order, then list position for the per-user layout). Timestamps are stored as epoch seconds
  (floats and sub-second timestamps are floored), but sorting uses the input precision
  (microseconds for timestamp types). Zone-aware timestamps are converted to UTC epochs.
* The k-core filter counts every row, so repeated (user, item) pairs count more than once.
* Only user, item and time are stored; other input columns are ignored (they stay in the source).
* Users whose per-user list is empty have no interactions and therefore do not appear.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from persrec import __version__
from persrec.data.schema import (
    DataValidationError,
    InputSchema,
    ResolvedColumns,
    check_unique_keys,
    validate_interactions_file,
    validate_item_table_file,
)
from persrec.data.store import (
    FORMAT_VERSION,
    ITEM_IDS_FILE,
    ITEM_TABLE_FILE,
    ITEMS_DTYPE,
    ITEMS_FILE,
    MANIFEST_FILE,
    OFFSETS_DTYPE,
    OFFSETS_FILE,
    TIMESTAMPS_DTYPE,
    TIMESTAMPS_FILE,
    USER_IDS_FILE,
    PreparedDataset,
)

logger = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")
_MAX_ITEMS = np.iinfo(np.int32).max


@dataclass(frozen=True)
class PrepareOptions:
    """How to read and filter the input, and the resources DuckDB may use.

    ``min_*_interactions`` are applied together and repeatedly until nothing changes (a k-core),
    because dropping rare items can push a user below the threshold and vice versa. Only
    ``schema`` and the two thresholds affect the result; the rest are resource knobs.
    """

    schema: InputSchema = field(default_factory=InputSchema)
    min_user_interactions: int = 0
    min_item_interactions: int = 0
    memory_limit: str = "3GB"
    threads: int = 2
    temp_dir: Path | None = None
    batch_rows: int = 1 << 20

    def result_key(self) -> dict[str, Any]:
        """The options that change the prepared output (used in the source fingerprint)."""
        return {
            "schema": self.schema.to_dict(),
            "min_user_interactions": int(self.min_user_interactions),
            "min_item_interactions": int(self.min_item_interactions),
        }


# --------------------------------------------------------------------------------------------- input files


def resolve_parquet_files(path: str | Path) -> list[Path]:
    """Expand a parquet file, a directory (searched recursively) or a glob into a sorted file list."""
    text = os.fspath(path)
    if _GLOB_CHARS & set(text):
        files = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
        if not files:
            raise FileNotFoundError(f"{text}: pattern matches no files")
        return files
    p = Path(text)
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*.parquet")
            if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
        )
        if not files:
            raise FileNotFoundError(f"{p}: directory contains no .parquet files")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file or directory")
    return [p]


def source_fingerprint(files: list[Path], item_files: list[Path], options: PrepareOptions) -> str:
    """Hash of input paths, sizes, mtimes and result-affecting options: equal hash, equal output."""

    def describe(f: Path) -> list[Any]:
        st = f.stat()
        return [str(f.resolve()), st.st_size, st.st_mtime_ns]

    payload = {
        "format_version": FORMAT_VERSION,
        "interactions": [describe(f) for f in files],
        "items": [describe(f) for f in item_files],
        "options": options.result_key(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- sql helpers


def _names(files: list[Path], limit: int = 3) -> str:
    """File list for error messages, shortened when long."""
    shown = ", ".join(map(str, files[:limit]))
    return shown + (f" (and {len(files) - limit} more)" if len(files) > limit else "")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _s(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _id_cast(kind: str, expr: str) -> str:
    return f"CAST({expr} AS {'BIGINT' if kind == 'int' else 'VARCHAR'})"


def _time_cast(kind: str, expr: str, unit: str | None) -> str:
    # Sort key at full input precision: ints as-is, floats as doubles, timestamps in microseconds
    # (nanosecond inputs are truncated, so ties below 1us fall back to input order).
    if kind == "int":
        return f"CAST({expr} AS BIGINT)"
    if kind == "float":
        return f"CAST({expr} AS DOUBLE)"
    return f"epoch_us(CAST({expr} AS {'TIMESTAMP_NS' if unit == 'ns' else 'TIMESTAMP'}))"


def _seconds(kind: str, expr: str) -> str:
    if kind == "int":
        return expr
    if kind == "float":
        return f"CAST(floor({expr}) AS BIGINT)"
    return f"CAST(floor({expr} / 1000000.0) AS BIGINT)"


def _arrow_reader(con: duckdb.DuckDBPyConnection, sql: str, batch_rows: int) -> pa.RecordBatchReader:
    rel = con.sql(sql)
    for name in ("to_arrow_reader", "fetch_arrow_reader", "record_batch"):  # newest duckdb API first
        method = getattr(rel, name, None)
        if method is not None:
            return method(batch_rows)
    raise RuntimeError("this duckdb version offers no arrow record batch reader")


# --------------------------------------------------------------------------------------------- writing


class _NpyWriter:
    """Sequential writer into a pre-allocated ``.npy`` file.

    The file is sized with ``open_memmap`` but filled through ordinary writes: dirty pages of a
    writable mapping count towards the process RSS, page-cache writes do not.
    """

    def __init__(self, path: Path, dtype: np.dtype, length: int) -> None:
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(length,))
        offset = mm.offset
        del mm
        self.dtype = np.dtype(dtype)
        self.length = length
        self.written = 0
        self._fh = open(path, "r+b")  # noqa: SIM115 - closed in close()
        self._fh.seek(offset)

    def write(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if self.written + len(values) > self.length:
            raise RuntimeError(f"{self._fh.name}: more rows than pre-allocated ({self.length})")
        self._fh.write(memoryview(values).cast("B"))
        self.written += len(values)

    def close(self) -> None:
        self._fh.close()


def _write_parquet(reader: pa.RecordBatchReader, path: Path, fixed: dict[str, pa.DataType]) -> int:
    """Stream a duckdb result into parquet, forcing the types of the ``fixed`` columns."""
    schema = pa.schema([pa.field(f.name, fixed.get(f.name, f.type)) for f in reader.schema])
    rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_table(pa.Table.from_batches([batch]).cast(schema))
            rows += batch.num_rows
    return rows


# --------------------------------------------------------------------------------------------- build steps


@dataclass
class _Source:
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


def _validate_sources(files: list[Path], schema: InputSchema) -> _Source:
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
        raise DataValidationError(f"{_names(files)}: input has no rows")
    return _Source(kept, starts, cols, units)


def _source_sql(src: _Source) -> str:
    """UNION ALL over the files, staging (u, i, t, seq[, pos]) with a global input row ordinal."""
    c = src.cols
    parts = []
    for f, start, unit in zip(src.files, src.starts, src.time_units, strict=True):
        scan = f"read_parquet({_s(str(f))}, file_row_number=true)"
        if c.layout == "interactions":
            parts.append(
                f"SELECT {_id_cast(c.user_kind, _q(c.user_col))} AS u, {_id_cast(c.item_kind, _q(c.item_col))} AS i, "
                f"{_time_cast(c.time_kind, _q(c.time_col), unit)} AS t, file_row_number + {start} AS seq FROM {scan}"
            )
        else:
            parts.append(
                f"SELECT {_id_cast(c.user_kind, 'u')} AS u, {_id_cast(c.item_kind, 'i')} AS i, "
                f"{_time_cast(c.time_kind, 't', unit)} AS t, seq, CAST(pos AS INTEGER) AS pos FROM ("
                f"SELECT {_q(c.user_col)} AS u, UNNEST({_q(c.item_col)}) AS i, UNNEST({_q(c.time_col)}) AS t, "
                f"UNNEST(range(len({_q(c.item_col)}))) AS pos, file_row_number + {start} AS seq FROM {scan})"
            )
    return " UNION ALL ".join(parts)


def _check_lists(con: duckdb.DuckDBPyConnection, src: _Source) -> None:
    """Per-user layout: every row needs a user and two non-null lists of equal length."""
    c = src.cols
    union = " UNION ALL ".join(
        f"SELECT {_q(c.user_col)} AS u, {_q(c.item_col)} AS o, {_q(c.time_col)} AS tl, "
        f"file_row_number + {start} AS seq FROM read_parquet({_s(str(f))}, file_row_number=true)"
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
            f"SELECT {_q(c.user_col)}, len({_q(c.item_col)}), len({_q(c.time_col)}) "
            f"FROM read_parquet({_s(str(f))}, file_row_number=true) WHERE file_row_number = {row}"
        ).fetchone()
        raise DataValidationError(
            f"{f}: row {row} (user {user!r}): column '{c.item_col}' has {n_items} element(s) but "
            f"'{c.time_col}' has {n_times}; the lists must have equal length"
        )


def _check_staged(con: duckdb.DuckDBPyConnection, src: _Source) -> None:
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


def _kcore(con: duckdb.DuckDBPyConnection, min_user: int, min_item: int, on_round: Any) -> int:
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


@contextmanager
def _connect(work: Path, options: PrepareOptions) -> Iterator[duckdb.DuckDBPyConnection]:
    spill = work / "spill"
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(work / "prepare.duckdb"))
    try:
        con.execute(f"SET memory_limit={_s(options.memory_limit)}")
        con.execute(f"SET threads={int(options.threads)}")
        con.execute(f"SET temp_directory={_s(str(spill))}")
        con.execute("SET preserve_insertion_order=false")  # every ordered result below has ORDER BY
        con.execute("SET TimeZone='UTC'")  # zone-aware timestamps become UTC epoch values
        yield con
    finally:
        con.close()


class _Steps:
    """Step-level progress bar plus debug timings."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc="prepare", unit="step", disable=not enabled, file=sys.stderr)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_description(f"prepare: {name}")
        start = time.perf_counter()
        yield
        logger.debug("prepare step %s took %.2fs", name, time.perf_counter() - start)
        self.bar.update(1)

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(text)
        if text:
            logger.debug("prepare: %s", text)

    def close(self) -> None:
        self.bar.set_description("prepare: done")
        self.bar.close()


@dataclass(frozen=True)
class _Counts:
    users: int
    items: int
    interactions: int


def _assign_ids(con: duckdb.DuckDBPyConnection, src: _Source, options: PrepareOptions) -> _Counts:
    """Dense indices in original-id order: users 0..U-1, items 1..N (0 stays free for padding)."""
    con.execute(
        "CREATE TABLE users AS SELECT u, c, CAST(row_number() OVER (ORDER BY u) - 1 AS INTEGER) AS user_idx FROM vu"
    )
    users, interactions = con.execute("SELECT count(*), coalesce(sum(c), 0) FROM users").fetchone()
    items = con.execute("SELECT count(*) FROM vi").fetchone()[0]
    if interactions == 0:
        raise DataValidationError(
            f"{_names(src.files)}: no interactions left after filtering with "
            f"min_user_interactions={options.min_user_interactions}, "
            f"min_item_interactions={options.min_item_interactions}"
        )
    if items > _MAX_ITEMS:
        raise DataValidationError(f"{_names(src.files)}: {items} distinct items exceed the int32 index range")
    con.execute(
        "CREATE TABLE items AS SELECT i, c, CAST(row_number() OVER (ORDER BY i) AS INTEGER) AS item_idx FROM vi"
    )
    return _Counts(int(users), int(items), int(interactions))


def _write_id_maps(con: duckdb.DuckDBPyConnection, cols: ResolvedColumns, out: Path, batch_rows: int) -> None:
    id_type = {"int": pa.int64(), "string": pa.string()}
    _write_parquet(
        _arrow_reader(con, "SELECT user_idx, u AS user_id FROM users ORDER BY user_idx", batch_rows),
        out / USER_IDS_FILE,
        {"user_idx": pa.int32(), "user_id": id_type[cols.user_kind]},
    )
    _write_parquet(
        _arrow_reader(con, "SELECT item_idx, i AS item_id FROM items ORDER BY item_idx", batch_rows),
        out / ITEM_IDS_FILE,
        {"item_idx": pa.int32(), "item_id": id_type[cols.item_kind]},
    )


def _write_histories(
    con: duckdb.DuckDBPyConnection, cols: ResolvedColumns, out: Path, batch_rows: int, progress: bool
) -> int:
    """Write offsets, then stream the (user, time, input order)-sorted rows; return the longest history."""
    counts = con.execute("SELECT c FROM users ORDER BY user_idx").fetchnumpy()["c"]
    offsets = np.zeros(len(counts) + 1, dtype=OFFSETS_DTYPE)
    np.cumsum(counts, out=offsets[1:])
    np.save(out / OFFSETS_FILE, offsets)
    order = "us.user_idx, r.t, r.seq" + (", r.pos" if cols.layout == "per_user" else "")
    reader = _arrow_reader(
        con,
        f"SELECT us.user_idx, it.item_idx, {_seconds(cols.time_kind, 'r.t')} AS ts FROM raw r "
        f"JOIN users us ON r.u = us.u JOIN items it ON r.i = it.i ORDER BY {order}",
        batch_rows,
    )
    _stream_histories(reader, out, offsets, progress)
    return int(counts.max())


def _manifest(
    counts: _Counts,
    max_history: int,
    cols: ResolvedColumns,
    options: PrepareOptions,
    source_info: dict[str, Any],
    has_items: bool,
) -> dict[str, Any]:
    id_type = {"int": "int64", "string": "string"}
    return {
        "format_version": FORMAT_VERSION,
        "num_users": counts.users,
        "num_items": counts.items,
        "num_interactions": counts.interactions,
        "max_history": max_history,
        "source": source_info,
        "schema": {
            **options.schema.to_dict(),
            "layout": cols.layout,
            "resolved": {"user": cols.user_col, "item": cols.item_col, "time": cols.time_col},
            "user_id_type": id_type[cols.user_kind],
            "item_id_type": id_type[cols.item_kind],
            "time_type": cols.time_kind,
            "id_order": "dense indices follow the sorted original ids",
        },
        "filters": {
            "min_user_interactions": int(options.min_user_interactions),
            "min_item_interactions": int(options.min_item_interactions),
        },
        "has_item_table": has_items,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "persrec_version": __version__,
    }


def _build(
    out: Path,
    work: Path,
    src: _Source,
    item_files: list[Path],
    item_text: list[str],
    options: PrepareOptions,
    source_info: dict[str, Any],
    progress: bool,
) -> None:
    cols = src.cols
    filtering = options.min_user_interactions > 1 or options.min_item_interactions > 1
    steps = _Steps(total=7 + bool(item_files), enabled=progress)
    try:
        with _connect(work, options) as con:
            with steps.step("reading input"):
                if cols.layout == "per_user":
                    _check_lists(con, src)
                try:
                    con.execute(f"CREATE TABLE raw AS {_source_sql(src)}")
                except duckdb.ConversionException as exc:
                    raise DataValidationError(f"{_names(src.files)}: {exc}") from exc
            with steps.step("validating"):
                _check_staged(con, src)
            with steps.step("k-core filter" if filtering else "counting"):
                rounds = _kcore(
                    con,
                    options.min_user_interactions,
                    options.min_item_interactions,
                    lambda k, du, di: steps.note(f"round {k}: -{du} users, -{di} items"),
                )
                steps.note(f"k-core stable after {rounds} round(s)" if filtering else "")
            with steps.step("assigning ids"):
                counts = _assign_ids(con, src, options)
            with steps.step("writing id maps"):
                _write_id_maps(con, cols, out, options.batch_rows)
            with steps.step("sorting histories"):
                max_history = _write_histories(con, cols, out, options.batch_rows, progress)
            if item_files:
                with steps.step("item table"):
                    _write_item_table(con, item_files, item_text, options, cols.item_kind, out)
            with steps.step("manifest"):
                manifest = _manifest(counts, max_history, cols, options, source_info, bool(item_files))
                (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    except duckdb.OutOfMemoryException as exc:
        raise MemoryError(
            f"prepare ran out of memory ({exc}); raise PrepareOptions.memory_limit, lower threads, "
            "or point temp_dir at a disk with more free space"
        ) from exc
    finally:
        steps.close()


def _stream_histories(reader: pa.RecordBatchReader, out: Path, offsets: np.ndarray, progress: bool) -> None:
    total = int(offsets[-1])
    items = _NpyWriter(out / ITEMS_FILE, ITEMS_DTYPE, total)
    stamps = _NpyWriter(out / TIMESTAMPS_FILE, TIMESTAMPS_DTYPE, total)
    bar = tqdm(total=total, desc="writing histories", unit="row", unit_scale=True, disable=not progress)
    try:
        for batch in reader:
            users = batch.column(0).to_numpy()
            pos = np.arange(items.written, items.written + batch.num_rows, dtype=np.int64)
            # Every row must land inside its user's CSR span; guards the sort/join plumbing.
            if not ((offsets[users] <= pos) & (pos < offsets[users + 1])).all():
                raise RuntimeError("sorted interactions do not match the per-user counts")
            items.write(batch.column(1).to_numpy())
            stamps.write(batch.column(2).to_numpy())
            bar.update(batch.num_rows)
    finally:
        bar.close()
        items.close()
        stamps.close()
    if items.written != total:
        raise RuntimeError(f"wrote {items.written} interactions, expected {total}")


def _write_item_table(
    con: duckdb.DuckDBPyConnection,
    files: list[Path],
    text_cols: list[str],
    options: PrepareOptions,
    item_kind: str,
    out: Path,
) -> None:
    key = options.schema.item_key_col
    files_sql = "[" + ", ".join(_s(str(f)) for f in files) + "]"
    text_sql = "".join(f", src.{_q(col)}" for col in text_cols)
    inner = "".join(f", {_q(col)}" for col in text_cols)
    sql = (
        f"SELECT it.item_idx, it.i AS item_id{text_sql} FROM items it LEFT JOIN "
        f"(SELECT {_id_cast(item_kind, _q(key))} AS __key{inner} FROM read_parquet({files_sql}, union_by_name=true)) src "
        "ON src.__key = it.i ORDER BY it.item_idx"
    )
    id_type = pa.int64() if item_kind == "int" else pa.string()
    _write_parquet(
        _arrow_reader(con, sql, options.batch_rows),
        out / ITEM_TABLE_FILE,
        {"item_idx": pa.int32(), "item_id": id_type},
    )


# --------------------------------------------------------------------------------------------- entry point


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(output: Path) -> None:
    """Delete leftovers of killed runs (their pid no longer exists) next to ``output``."""
    if not output.parent.is_dir():
        return
    prefixes = (f".{output.name}.tmp", f".{output.name}.old")
    for entry in output.parent.glob(f".{glob.escape(output.name)}.*-*"):
        kind, _, pid = entry.name.rpartition("-")
        if kind in prefixes and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _existing(output: Path, fingerprint: str, overwrite: bool, progress: bool) -> PreparedDataset | None:
    """Return the existing dataset when it is up to date; raise when it may not be replaced."""
    if not output.exists():
        return None
    if not output.is_dir():
        raise FileExistsError(f"{output}: exists and is not a directory")
    manifest_path = output / MANIFEST_FILE
    try:
        old = json.loads(manifest_path.read_text())
        old_fp = old.get("source", {}).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        old_fp = None
    if old_fp == fingerprint:
        try:
            dataset = PreparedDataset.open(output)
        except DataValidationError:
            if not overwrite:
                raise
        else:
            logger.info("%s is up to date", output)
            if progress:
                print(f"prepare: {output} is up to date", file=sys.stderr)
            return dataset
    elif not manifest_path.is_file() and any(output.iterdir()):
        # Never delete a directory we did not create, even with overwrite=True.
        raise FileExistsError(
            f"{output}: exists, is not empty and is not a prepared dataset; choose another path"
        )
    elif not overwrite:
        raise FileExistsError(
            f"{output}: already exists and was prepared from different input or options; "
            "pass overwrite=True to replace it"
        )
    return None


def _install(tmp: Path, output: Path) -> None:
    if not output.exists():
        os.replace(tmp, output)
        return
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


def prepare_dataset(
    interactions: Path,
    output: Path,
    *,
    items: Path | None = None,
    options: PrepareOptions = PrepareOptions(),
    overwrite: bool = False,
    progress: bool = True,
) -> PreparedDataset:
    """Validate, filter and convert interaction parquet into a prepared dataset at ``output``.

    ``interactions`` is a parquet file, a directory of them or a glob; ``items`` optionally adds an
    item table keyed by ``schema.item_key_col``. The output appears atomically; re-running with
    unchanged input and options returns the existing dataset without work.
    """
    output = Path(output)
    files = [f.resolve() for f in resolve_parquet_files(interactions)]
    item_files = [f.resolve() for f in resolve_parquet_files(items)] if items is not None else []
    fingerprint = source_fingerprint(files, item_files, options)
    existing = _existing(output, fingerprint, overwrite, progress)
    if existing is not None:
        return existing

    src = _validate_sources(files, options.schema)
    item_text: list[str] = []
    if item_files:
        for f in item_files:
            kind, item_text = validate_item_table_file(f, options.schema)
            if kind != src.cols.item_kind:
                raise DataValidationError(
                    f"{f}: column '{options.schema.item_key_col}' holds {kind} keys but the interactions' "
                    f"item ids are {src.cols.item_kind}s; the key must use the same ids"
                )
        check_unique_keys(item_files, options.schema.item_key_col)

    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(output)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    own_work = options.temp_dir is None
    work = (
        tmp / "_work" if own_work else Path(tempfile.mkdtemp(prefix="persrec-prepare-", dir=options.temp_dir))
    )
    source_info = {
        "files": [str(f) for f in files],
        "item_files": [str(f) for f in item_files],
        "fingerprint": fingerprint,
    }
    try:
        _build(tmp, work, src, item_files, item_text, options, source_info, progress)
        shutil.rmtree(work)
        _install(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if not own_work:
            shutil.rmtree(work, ignore_errors=True)
    return PreparedDataset.open(output)

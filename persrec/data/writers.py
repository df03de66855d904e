"""Write side of ``prepare``: stream the staged DuckDB tables into the prepared dataset's files.

Results leave DuckDB as Arrow record batches, so memory stays bounded by ``batch_rows`` however
large the dataset is. The tables read here (``raw``, ``users``, ``items``) are described in
:mod:`persrec.data.staging`.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from persrec.data.schema import ResolvedColumns
from persrec.data.staging import id_cast, quote_ident, quote_literal
from persrec.data.store import (
    ITEM_IDS_FILE,
    ITEM_TABLE_FILE,
    ITEMS_DTYPE,
    ITEMS_FILE,
    OFFSETS_DTYPE,
    OFFSETS_FILE,
    TIMESTAMPS_DTYPE,
    TIMESTAMPS_FILE,
    USER_IDS_FILE,
)


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


def write_id_maps(con: duckdb.DuckDBPyConnection, cols: ResolvedColumns, out: Path, batch_rows: int) -> None:
    """Dense index -> original id tables for users and items, in index order."""
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


def write_histories(
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


def write_item_table(
    con: duckdb.DuckDBPyConnection,
    files: list[Path],
    text_cols: list[str],
    key: str,
    item_kind: str,
    out: Path,
    batch_rows: int,
) -> None:
    """Item table in item-index order; items missing from ``files`` keep null text columns."""
    files_sql = "[" + ", ".join(quote_literal(str(f)) for f in files) + "]"
    text_sql = "".join(f", src.{quote_ident(col)}" for col in text_cols)
    inner = "".join(f", {quote_ident(col)}" for col in text_cols)
    sql = (
        f"SELECT it.item_idx, it.i AS item_id{text_sql} FROM items it LEFT JOIN "
        f"(SELECT {id_cast(item_kind, quote_ident(key))} AS __key{inner} "
        f"FROM read_parquet({files_sql}, union_by_name=true)) src "
        "ON src.__key = it.i ORDER BY it.item_idx"
    )
    id_type = pa.int64() if item_kind == "int" else pa.string()
    _write_parquet(
        _arrow_reader(con, sql, batch_rows),
        out / ITEM_TABLE_FILE,
        {"item_idx": pa.int32(), "item_id": id_type},
    )

"""Input column layout and the metadata-level checks that run before any data is scanned.

Checks here read only parquet footers (schema, row counts, column statistics), so a bad file is
rejected in milliseconds with a message naming the file and column instead of failing deep
inside a long out-of-core job.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

Layout = Literal["interactions", "per_user"]
IdKind = Literal["int", "string"]
TimeKind = Literal["int", "float", "timestamp"]


class DataValidationError(ValueError):
    """Input or stored data does not have the expected shape; the message names file and column."""


@dataclass(frozen=True)
class InputSchema:
    """Column names of the raw input.

    Two interaction layouts are understood: one row per interaction (``user_col``, ``item_col``,
    ``time_col``) and one row per user holding parallel lists (``user_col``, ``list_item_col``,
    ``list_time_col``). The layout is detected from the data: a list-typed item column means
    one row per user. ``text_cols=None`` keeps every non-key column of the item table.
    """

    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    list_item_col: str = "object_id"
    list_time_col: str = "event_time"
    item_key_col: str = "item_id"
    text_cols: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.text_cols is not None and not isinstance(self.text_cols, tuple):
            object.__setattr__(self, "text_cols", tuple(self.text_cols))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["text_cols"] = None if self.text_cols is None else list(self.text_cols)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSchema:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown InputSchema field(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class ResolvedColumns:
    """The concrete columns and kinds found in an interactions file."""

    layout: Layout
    user_col: str
    item_col: str
    time_col: str
    user_kind: IdKind
    item_kind: IdKind
    time_kind: TimeKind


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def is_list_type(t: pa.DataType) -> bool:
    checks = [pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list]
    if hasattr(pa.types, "is_list_view"):
        checks += [pa.types.is_list_view, pa.types.is_large_list_view]
    return any(check(t) for check in checks)


def id_kind(t: pa.DataType) -> IdKind | None:
    """'int' or 'string' for a usable id type, None otherwise."""
    t = _value_type(t)
    if pa.types.is_integer(t):
        return "int"
    is_view = getattr(pa.types, "is_string_view", lambda _t: False)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t):
        return "string"
    return None


def time_kind(t: pa.DataType) -> TimeKind | None:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_timestamp(t):
        return "timestamp"
    return None


def missing_column_error(
    source: str | Path, column: str, available: Sequence[str], role: str
) -> DataValidationError:
    """Error for a missing column that lists what is there and suggests the closest name."""
    msg = (
        f"{source}: missing {role} column '{column}'. Available columns: {', '.join(available) or '(none)'}."
    )
    lowered = {name.lower(): name for name in available}
    close = difflib.get_close_matches(column, list(available), n=1, cutoff=0.5)
    guess = lowered.get(column.lower()) or (close[0] if close else None)
    if guess is not None:
        msg += f" Did you mean '{guess}'?"
    return DataValidationError(msg + " Set the column name in InputSchema to use another column.")


def _require(arrow_schema: pa.Schema, source: str | Path, column: str, role: str) -> pa.DataType:
    if column not in arrow_schema.names:
        raise missing_column_error(source, column, arrow_schema.names, role)
    return arrow_schema.field(column).type


def _check_id(source: str | Path, column: str, t: pa.DataType) -> IdKind:
    kind = id_kind(t)
    if kind is None:
        raise DataValidationError(
            f"{source}: column '{column}' has type {t}; ids must be integer or string"
            + (" (floats usually mean the ids had missing values)" if pa.types.is_floating(t) else "")
        )
    return kind


def _check_time(source: str | Path, column: str, t: pa.DataType) -> TimeKind:
    kind = time_kind(t)
    if kind is None:
        raise DataValidationError(
            f"{source}: column '{column}' has type {t}; timestamps must be integer, float or timestamp"
        )
    return kind


def detect_layout(arrow_schema: pa.Schema, schema: InputSchema, source: str | Path) -> ResolvedColumns:
    """Resolve the layout and column kinds of an interactions file from its arrow schema."""
    names = arrow_schema.names
    user_t = _require(arrow_schema, source, schema.user_col, "user id")
    if schema.item_col in names and not is_list_type(arrow_schema.field(schema.item_col).type):
        item_t = arrow_schema.field(schema.item_col).type
        time_t = _require(arrow_schema, source, schema.time_col, "timestamp")
        if is_list_type(time_t):
            raise DataValidationError(
                f"{source}: column '{schema.time_col}' is a list but item column '{schema.item_col}' is not; "
                "both must be scalars (one row per interaction) or both lists (one row per user)"
            )
        return ResolvedColumns(
            layout="interactions",
            user_col=schema.user_col,
            item_col=schema.item_col,
            time_col=schema.time_col,
            user_kind=_check_id(source, schema.user_col, user_t),
            item_kind=_check_id(source, schema.item_col, item_t),
            time_kind=_check_time(source, schema.time_col, time_t),
        )

    # One row per user: the item column is a list (either name is accepted).
    item_col = schema.item_col if schema.item_col in names else schema.list_item_col
    if item_col not in names:
        candidates = [c for c in names if c != schema.user_col]
        raise missing_column_error(
            source, schema.item_col, candidates, f"item id (or per-user list '{schema.list_item_col}')"
        )
    item_t = arrow_schema.field(item_col).type
    if not is_list_type(item_t):
        raise DataValidationError(
            f"{source}: column '{item_col}' has type {item_t}; expected a list of item ids (one row per user)"
        )
    time_col = next((c for c in (schema.list_time_col, schema.time_col) if c in names), schema.list_time_col)
    time_t = _require(arrow_schema, source, time_col, "per-user timestamp list")
    if not is_list_type(time_t):
        raise DataValidationError(
            f"{source}: column '{time_col}' has type {time_t}; expected a list of timestamps parallel to '{item_col}'"
        )
    return ResolvedColumns(
        layout="per_user",
        user_col=schema.user_col,
        item_col=item_col,
        time_col=time_col,
        user_kind=_check_id(source, schema.user_col, user_t),
        item_kind=_check_id(source, f"{item_col} (list element)", item_t.value_type),
        time_kind=_check_time(source, f"{time_col} (list element)", time_t.value_type),
    )


def _leaf_index(pf: pq.ParquetFile) -> dict[str, int]:
    return {pf.schema.column(j).path: j for j in range(pf.metadata.num_columns)}


def check_statistics(pf: pq.ParquetFile, source: str | Path, columns: dict[str, bool]) -> None:
    """Reject nulls (and negative ints where flagged) using row-group statistics when present.

    ``columns`` maps a flat column name to whether negative values are an error. Files without
    statistics pass here; the full scan in ``prepare`` catches them.
    """
    leaves = _leaf_index(pf)
    md = pf.metadata
    first_row = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for name, no_negative in columns.items():
            j = leaves.get(name)
            stats = rg.column(j).statistics if j is not None else None
            if stats is None:
                continue
            rows = f"row group {g}, rows {first_row}..{first_row + rg.num_rows - 1}"
            if stats.has_null_count and stats.null_count > 0:
                raise DataValidationError(
                    f"{source}: column '{name}' has {stats.null_count} null value(s) in {rows}; "
                    "ids and timestamps must not be null"
                )
            if no_negative and stats.has_min_max and isinstance(stats.min, int) and stats.min < 0:
                raise DataValidationError(
                    f"{source}: column '{name}' has negative id {stats.min} in {rows}; integer ids must be >= 0"
                )
        first_row += rg.num_rows


def validate_interactions_file(
    path: Path, schema: InputSchema, *, allow_empty: bool = False
) -> ResolvedColumns:
    """Check an interactions parquet file from its footer and return its resolved columns."""
    pf = _open_parquet(path)
    if pf.metadata.num_rows == 0 and not allow_empty:
        raise DataValidationError(f"{path}: file has no rows")
    cols = detect_layout(pf.schema_arrow, schema, path)
    if cols.layout == "interactions":
        check_statistics(
            pf,
            path,
            {
                cols.user_col: cols.user_kind == "int",
                cols.item_col: cols.item_kind == "int",
                cols.time_col: False,
            },
        )
    else:
        check_statistics(pf, path, {cols.user_col: cols.user_kind == "int"})
    return cols


def validate_item_table_file(path: Path, schema: InputSchema) -> tuple[IdKind, list[str]]:
    """Check an item table file's footer; return the key kind and the text columns to keep."""
    pf = _open_parquet(path)
    arrow_schema = pf.schema_arrow
    key_t = _require(arrow_schema, path, schema.item_key_col, "item key")
    kind = _check_id(path, schema.item_key_col, key_t)
    if schema.text_cols is None:
        text = [c for c in arrow_schema.names if c != schema.item_key_col]
    else:
        text = list(schema.text_cols)
        for col in text:
            _require(arrow_schema, path, col, "item text")
    for col in text:
        if col in ("item_idx", "item_id") and col != schema.item_key_col:
            raise DataValidationError(
                f"{path}: item table column '{col}' clashes with a column of the prepared item table; "
                "rename it or leave it out of InputSchema.text_cols"
            )
    check_statistics(pf, path, {schema.item_key_col: kind == "int"})
    return kind, text


def check_unique_keys(paths: Sequence[Path], column: str) -> None:
    """Duplicate item keys would make the item -> text join ambiguous, so they are an error."""
    parts = []
    for path in paths:
        keys = read_column(path, column)
        keys = keys.cast(pa.int64() if id_kind(keys.type) == "int" else pa.string())
        if keys.null_count:
            raise DataValidationError(f"{path}: column '{column}' has {keys.null_count} null key(s)")
        parts.append(keys)
    if not parts:
        return
    if len({part.type for part in parts}) > 1:
        raise DataValidationError(
            f"{', '.join(map(str, paths))}: column '{column}' mixes integer and string keys across files"
        )
    all_keys = pa.chunked_array([c for part in parts for c in part.chunks], type=parts[0].type)
    counts = pc.value_counts(all_keys)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        example = dup[0]["values"]
        where = [
            str(p) for p, keys in zip(paths, parts, strict=True) if pc.any(pc.equal(keys, example)).as_py()
        ]
        raise DataValidationError(
            f"{', '.join(where)}: column '{column}' has {len(dup)} duplicate item key(s), e.g. "
            f"{example.as_py()!r} appears {dup[0]['counts'].as_py()} times; item keys must be unique"
        )


def read_column(path: Path, column: str) -> pa.ChunkedArray:
    """One column of a parquet file; damaged pages become a message naming the file."""
    try:
        return pq.read_table(path, columns=[column]).column(column)
    except (pa.ArrowException, OSError) as exc:
        raise DataValidationError(
            f"{path}: not a readable parquet file ({exc}); it may be corrupt or truncated"
        ) from exc


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such parquet file")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataValidationError(f"{path}: not a readable parquet file ({exc})") from exc

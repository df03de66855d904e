"""MerRec (Mercari C2C marketplace events) to canonical parquet, streamed through DuckDB.

Source: the MerRec release on the Hugging Face hub (``mercari-us/merrec``; Li et al., "MerRec: A Large-scale
Multipurpose Mercari Dataset for Consumer-to-Consumer Recommendation Systems", 2024): monthly folders of parquet
files, one row per event. Licence: CC BY-NC-SA 4.0 (non-commercial, share alike, attribution). Publisher's
figures: 5.56 M users, 83.07 M items, 1.27 B events over six event types (not re-measured here; the scaling
benchmark in ``benchmarks/merrec_scale.py`` runs on a synthetic file of the same schema).

Columns read: ``user_id``, the object id (``product_id`` by default as the PerSRec authors did, or ``item_id``:
one listing), ``event_id`` (``item_view``, ``item_like``, ``item_add_to_cart_tap``, ``offer_make``,
``buy_start``, ``buy_comp``; kept as the ``event`` column and filterable with ``events``) and ``stime`` (the event
time; timestamps, epoch seconds or ISO strings). ``sequence_id`` is kept when present.

Item table (one row per object id; the values of its latest event, as a listing's attributes may change):
``name``, ``brand_name``, ``c0_name`` / ``c1_name`` / ``c2_name`` and ``category`` = the most specific non-null of
c2 / c1 / c0, all plain strings; columns missing from the files are left out. The paper's ``min_seq_len``
(``merrec_2000``: users with at least 2000 events) is recorded as the prepared dataset's user minimum.

Nothing is loaded whole: the interactions are one ``COPY`` from ``read_parquet`` and the item table one
``GROUP BY`` that DuckDB spills to disk under its memory limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from persrec.config import ConfigError
from persrec.data.datasets.builder_io import (
    copy_to_parquet,
    duck,
    epoch_seconds_sql,
    ident,
    is_time_type,
    nonempty_text_sql,
    parquet_schema,
    quote_literal,
    require_columns,
    sql_paths,
)
from persrec.data.datasets.movielens import INTERACTIONS_FILE, ITEMS_FILE, BuiltDataset
from persrec.data.prepare import resolve_parquet_files
from persrec.data.schema import DataValidationError
from persrec.data.staging import file_names

MERREC_LICENSE = "MerRec (Mercari, Inc.): CC BY-NC-SA 4.0 - non-commercial use, attribution, derivatives under the same licence."
EVENT_TYPES = ("item_view", "item_like", "item_add_to_cart_tap", "offer_make", "buy_start", "buy_comp")
OBJECT_IDS = ("product_id", "item_id")
TEXT_COLUMNS = ["name", "brand_name", "c0_name", "c1_name", "c2_name"]


@dataclass(frozen=True)
class MerrecOptions:
    object_id: str = field(
        default="product_id",
        metadata={"help": "item identity: product_id (the paper's) or item_id (a listing)"},
    )
    events: str | None = field(
        default=None,
        metadata={"help": f"comma-separated event types to keep (default all: {', '.join(EVENT_TYPES)})"},
    )
    min_seq_len: int = field(
        default=0,
        metadata={"help": "keep users with at least this many events (the paper's merrec_2000: 2000)"},
    )
    items: bool = field(default=True, metadata={"help": "write the item table (name, brand, categories)"})
    memory_limit: str = field(default="3GB", metadata={"help": "DuckDB memory limit (it spills beyond it)"})

    def event_list(self) -> list[str] | None:
        if self.events is None or not self.events.strip():
            return None
        chosen = [e.strip() for e in self.events.split(",") if e.strip()]
        unknown = [e for e in chosen if e not in EVENT_TYPES]
        if unknown:
            raise ConfigError(
                f"--events: unknown MerRec event type(s) {', '.join(unknown)}; expected some of {', '.join(EVENT_TYPES)}"
            )
        return chosen

    def __post_init__(self) -> None:
        if self.object_id not in OBJECT_IDS:
            raise ConfigError(f"--object_id {self.object_id!r}: expected one of {', '.join(OBJECT_IDS)}")
        if self.min_seq_len < 0:
            raise ConfigError(f"--min_seq_len {self.min_seq_len}: expected a count >= 0")
        self.event_list()


def input_files(path: Path, options: MerrecOptions) -> list[Path]:
    return resolve_parquet_files(Path(path).expanduser())


def _checked_schema(files: list[Path], options: MerrecOptions) -> pa.Schema:
    """Every file must carry the needed columns with the same types (they are read as one table)."""
    needed = ["user_id", options.object_id, "event_id", "stime"]
    first: pa.Schema | None = None
    for f in files:
        schema = parquet_schema(f, "merrec")
        require_columns(f, schema.names, needed, f"a MerRec event file (object_id={options.object_id})")
        if not is_time_type(schema.field("stime").type):
            raise DataValidationError(
                f"{f}: column 'stime' is {schema.field('stime').type}, expected a timestamp, epoch seconds or text"
            )
        if first is None:
            first = schema
        elif any(first.field(c).type != schema.field(c).type for c in needed):
            raise DataValidationError(f"{f}: types of {', '.join(needed)} differ from {files[0]}")
    assert first is not None
    return first


def _id_sql(column: str, dtype: pa.DataType) -> str:
    return f"CAST({ident(column)} AS {'BIGINT' if pa.types.is_integer(dtype) else 'VARCHAR'})"


def _interactions_sql(files: list[Path], schema: pa.Schema, options: MerrecOptions) -> str:
    obj = options.object_id
    columns = [
        f"{_id_sql('user_id', schema.field('user_id').type)} AS user_id",
        f"{_id_sql(obj, schema.field(obj).type)} AS item_id",
        f"{epoch_seconds_sql('stime', schema.field('stime').type)} AS timestamp",
        "CAST(event_id AS VARCHAR) AS event",
    ]
    if "sequence_id" in schema.names:
        columns.append("sequence_id")
    where = [f"{ident(obj)} IS NOT NULL", "user_id IS NOT NULL", "stime IS NOT NULL"]
    events = options.event_list()
    if events is not None:
        where.append(f"CAST(event_id AS VARCHAR) IN ({', '.join(quote_literal(e) for e in events)})")
    return f"SELECT {', '.join(columns)} FROM read_parquet({sql_paths(files)}) WHERE {' AND '.join(where)}"


def _items_sql(files: list[Path], schema: pa.Schema, options: MerrecOptions) -> str:
    obj = options.object_id
    present = [c for c in TEXT_COLUMNS if c in schema.names]
    latest = [
        f"arg_max({nonempty_text_sql(ident(c))}, stime) FILTER (WHERE {nonempty_text_sql(ident(c))} IS NOT NULL) "
        f"AS {ident(c)}"
        for c in present
    ]
    levels = [ident(c) for c in ("c2_name", "c1_name", "c0_name") if c in present]
    category = f", coalesce({', '.join(levels)}) AS category" if levels else ""
    names = "".join(f", {ident(c)}" for c in present)
    inner = (
        f"SELECT {_id_sql(obj, schema.field(obj).type)} AS item_id{''.join(', ' + x for x in latest)} "
        f"FROM read_parquet({sql_paths(files)}) WHERE {ident(obj)} IS NOT NULL GROUP BY 1"
    )
    return f"SELECT item_id{names}{category} FROM ({inner}) ORDER BY item_id"


def build_merrec(path: Path, out_dir: Path, options: MerrecOptions = MerrecOptions()) -> BuiltDataset:
    """Stream MerRec event parquet (a file, a folder searched recursively or a glob) into canonical parquet."""
    files = input_files(path, options)
    schema = _checked_schema(files, options)
    out_dir = Path(out_dir)
    items = None
    with duck(memory_limit=options.memory_limit) as con:
        copy_to_parquet(
            con, _interactions_sql(files, schema, options), out_dir / INTERACTIONS_FILE, file_names(files)
        )
        if options.items:
            items = out_dir / ITEMS_FILE
            copy_to_parquet(con, _items_sql(files, schema, options), items, file_names(files))
    return BuiltDataset(
        interactions=out_dir / INTERACTIONS_FILE,
        items=items,
        min_user_interactions=int(options.min_seq_len),
        min_item_interactions=0,
        name="merrec",
        license_note=MERREC_LICENSE,
    )

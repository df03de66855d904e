"""Streaming reader for the McAuley-lab Amazon ``meta_<Category>.json.gz`` item files.

The 2014 release writes one Python literal dict per line (single quotes, ``True``), so ``json`` cannot read it;
it is parsed with ``ast.literal_eval``, which accepts literals only and never executes code. The 2018 release is
JSON lines. Each line is tried as JSON first, then as a literal, so either release (or a mix) reads the same way.

Output columns, all plain strings with HTML entities unescaped (``&amp;`` -> ``&``) and blank text as null:
``title``; ``description`` (a 2018 list of paragraphs joined with a space); ``categories`` (2014 ``categories``
list of category paths, or 2018 ``category`` list, flattened, de-duplicated in order, joined with ``", "``);
``brand``. Rows are written in batches, so a multi-gigabyte meta file never sits in memory.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from persrec.atomic import atomic_path
from persrec.data.schema import DataValidationError

META_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("description", pa.string()),
        ("categories", pa.string()),
        ("brand", pa.string()),
    ]
)


def clean_text(value: Any, separator: str = " ") -> str | None:
    """Unescaped, whitespace-collapsed text; lists are joined; anything blank is None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [clean_text(v) for v in value]
        value = separator.join(p for p in parts if p)
    text = " ".join(html.unescape(str(value)).split())
    return text or None


def flatten_categories(value: Any) -> str | None:
    """``[["Toys & Games", "Puzzles"], ["Toys & Games"]]`` -> ``"Toys & Games, Puzzles"``."""
    seen: dict[str, None] = {}

    def walk(node: Any) -> None:
        if isinstance(node, (list, tuple)):
            for child in node:
                walk(child)
        elif node is not None:
            text = clean_text(node)
            if text:
                seen.setdefault(text, None)

    walk(value)
    return ", ".join(seen) or None


def parse_line(line: str, where: str) -> dict[str, Any]:
    """One record: JSON, else a Python literal (``ast.literal_eval``: literals only, no code runs)."""
    try:
        record = json.loads(line)
    except ValueError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            raise DataValidationError(
                f"{where}: not a JSON object or a Python literal dict (Amazon meta_*.json.gz lines are one of "
                f"these): {line[:80]!r}"
            ) from exc
    if not isinstance(record, dict):
        raise DataValidationError(f"{where}: expected a dict per line, got {type(record).__name__}")
    return record


def meta_rows(path: Path) -> Iterator[dict[str, str | None]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = parse_line(line, f"{path}:{lineno}")
                asin = record.get("asin")
                if not asin:
                    raise DataValidationError(f"{path}:{lineno}: record has no 'asin' (the item id)")
                yield {
                    "item_id": str(asin).strip(),
                    "title": clean_text(record.get("title")),
                    "description": clean_text(record.get("description")),
                    "categories": flatten_categories(record.get("categories", record.get("category"))),
                    "brand": clean_text(record.get("brand")),
                }
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"{path}: cannot read it as (gzipped) UTF-8 text lines ({exc})") from exc


def write_meta_parquet(path: Path, out: Path, batch_rows: int = 50_000) -> int:
    """Stream ``path`` into ``out`` (atomically); the first record of a repeated asin wins. Returns rows."""
    seen: set[str] = set()
    written = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, META_SCHEMA, compression="zstd") as writer:
        batch: list[dict[str, str | None]] = []
        for row in meta_rows(path):
            if row["item_id"] in seen:
                continue
            seen.add(row["item_id"])  # type: ignore[arg-type]
            batch.append(row)
            if len(batch) >= batch_rows:
                writer.write_table(pa.Table.from_pylist(batch, schema=META_SCHEMA))
                written += len(batch)
                batch = []
        if batch or not written:
            writer.write_table(pa.Table.from_pylist(batch, schema=META_SCHEMA))
            written += len(batch)
    return written

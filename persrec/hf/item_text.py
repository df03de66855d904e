"""Each item's text for an item LLM: a prompt, then `key: value` for every text field, in item-index order.

The text comes from the prepared dataset's item table (`persrec prepare --items`, keyed by `item_idx`) or from a
separate parquet file keyed by the original item id (`--text_path`, the HLLM authors' flag). An item without any
text would get an embedding from the prompt alone, the same for all such items: that is refused, not guessed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from persrec.config import ConfigError
from persrec.data.store import ITEM_TABLE_FILE, PreparedDataset

DEFAULT_ITEM_PROMPT = "Compress the following sentence into embedding: "
"""The HLLM reference's item prompt."""
ID_COLUMNS = ("item_idx", "item_id")
LIST_JOINER = ", "
EXAMPLES_SHOWN = 5


@dataclass(frozen=True)
class ItemTextOptions:
    """How item texts are built. `text_keys=None` uses every column of the source except the id columns."""

    text_keys: tuple[str, ...] | None = None
    prompt: str = DEFAULT_ITEM_PROMPT
    text_path: Path | None = None
    text_id_col: str = "item_id"
    field_separator: str = " "


@dataclass(frozen=True)
class ItemTexts:
    """`texts[i]` is the full string (prompt included) the item LLM reads for item index i; `texts[0]` is the
    padding item's empty string. `source` and `keys` say where the text came from."""

    texts: tuple[str, ...]
    prompt: str
    keys: tuple[str, ...]
    source: Path

    @property
    def num_items(self) -> int:
        return len(self.texts) - 1

    def fingerprint(self, max_text_length: int) -> str:
        """A digest of everything that decides the tokens the item LLM sees (texts, prompt, keys, truncation):
        equal fingerprints mean equal inputs, so cached embeddings can be reused."""
        digest = hashlib.sha256()
        header = {"prompt": self.prompt, "keys": list(self.keys), "max_text_length": int(max_text_length)}
        digest.update(json.dumps(header, sort_keys=True).encode())
        for text in self.texts:
            encoded = text.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
        return digest.hexdigest()


def format_value(value: Any) -> str | None:
    """One field's text, or None when it carries none (null, NaN, empty); list values are comma-joined."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, (list, tuple)):
        parts = [part for part in map(format_value, value) if part]
        return LIST_JOINER.join(parts) or None
    if isinstance(value, dict):
        parts = [f"{k}: {v}" for k, v in value.items() if format_value(v)]
        return LIST_JOINER.join(parts) or None
    text = str(value).strip()
    return text or None


def item_text(row: dict[str, Any], keys: Sequence[str], separator: str = " ") -> str:
    """`key: value` for each key with a value, in the order of `keys`; "" when no field has text."""
    fields = [(key, format_value(row.get(key))) for key in keys]
    return separator.join(f"{key}: {value}" for key, value in fields if value is not None)


def _read_table(path: Path, what: str) -> pa.Table:
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file; expected a parquet file of item texts")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ConfigError(f"{what} {path}: not a readable parquet file ({error})") from None


def _choose_keys(
    table: pa.Table, keys: tuple[str, ...] | None, exclude: Sequence[str], where: str
) -> list[str]:
    available = [name for name in table.column_names if name not in exclude]
    if keys is None:
        if not available:
            raise ConfigError(f"{where}: has no text columns besides {', '.join(exclude)}")
        return available
    if not keys:
        raise ConfigError(f"--text_keys: expected one or more column names of {where}")
    missing = [key for key in keys if key not in table.column_names]
    if missing:
        raise ConfigError(
            f"--text_keys: column(s) {', '.join(missing)} not in {where}; it has: {', '.join(available) or 'none'}"
        )
    return list(keys)


def _texts_from_dataset(path: Path, options: ItemTextOptions) -> tuple[list[str], list[str], list[Any], Path]:
    store = PreparedDataset.open(path, full_check=False)
    file = store.path / ITEM_TABLE_FILE
    if not store.manifest["has_item_table"]:
        raise ConfigError(
            f"{store.path}: the prepared dataset has no item table ({ITEM_TABLE_FILE}); prepare it with "
            "persrec prepare --items FILE, or pass --text_path FILE (parquet of item texts keyed by item id)"
        )
    table = _read_table(file, "item table")
    keys = _choose_keys(table, options.text_keys, ID_COLUMNS, str(file))
    ids = table.column("item_id").to_pylist()
    order = table.column("item_idx").to_pylist()
    expected = list(range(1, store.num_items + 1))
    if order != expected:
        raise ConfigError(f"{file}: item_idx is not 1..{store.num_items} in order; prepare the dataset again")
    rows = table.select(keys).to_pylist()
    texts = [item_text(row, keys, options.field_separator) for row in rows]
    return texts, keys, ids, file


def _id_key(value: Any, as_int: bool) -> Any:
    return int(value) if as_int else str(value)


def _texts_from_file(path: Path, options: ItemTextOptions) -> tuple[list[str], list[str], list[Any], Path]:
    ids = PreparedDataset.open(path, full_check=False).item_id_map().sort_by("item_idx")
    ids = ids.column("item_id").to_pylist()
    file = Path(options.text_path).expanduser()  # type: ignore[arg-type]
    table = _read_table(file, "--text_path")
    key_col = options.text_id_col
    if key_col not in table.column_names:
        raise ConfigError(
            f"--text_path {file}: no column {key_col!r} to key items by; it has: {', '.join(table.column_names)}"
        )
    keys = _choose_keys(table, options.text_keys, (key_col, *ID_COLUMNS), f"--text_path {file}")
    file_ids = table.column(key_col)
    both_int = pa.types.is_integer(file_ids.type) and all(isinstance(i, int) for i in ids)
    by_id: dict[Any, dict[str, Any]] = {}
    for item_id, row in zip(file_ids.to_pylist(), table.select(keys).to_pylist(), strict=True):
        if item_id is None:
            raise ConfigError(f"--text_path {file}: column {key_col!r} has a null item id")
        key = _id_key(item_id, both_int)
        if key in by_id:
            raise ConfigError(
                f"--text_path {file}: item id {item_id!r} appears more than once in {key_col!r}"
            )
        by_id[key] = row
    texts = [item_text(by_id.get(_id_key(i, both_int), {}), keys, options.field_separator) for i in ids]
    return texts, keys, ids, file


def load_item_texts(
    dataset: str | Path | PreparedDataset, options: ItemTextOptions | None = None
) -> ItemTexts:
    """Every item's text in item-index order (1..N, index 0 the padding item's "").

    Raises ConfigError when the source, a column or any item's text is missing."""
    options = options or ItemTextOptions()
    path = dataset.path if isinstance(dataset, PreparedDataset) else Path(dataset)
    if options.text_path is not None:
        texts, keys, ids, file = _texts_from_file(path, options)
    else:
        texts, keys, ids, file = _texts_from_dataset(path, options)
    empty = [item_id for item_id, text in zip(ids, texts, strict=True) if not text]
    if empty:
        shown = ", ".join(map(repr, empty[:EXAMPLES_SHOWN])) + (
            ", ..." if len(empty) > EXAMPLES_SHOWN else ""
        )
        raise ConfigError(
            f"{len(empty)} of {len(ids)} items have no text in column(s) {', '.join(keys)} of {file} "
            f"(item ids {shown}); give every item a value in one of --text_keys, or choose other --text_keys"
        )
    full = ("", *(options.prompt + text for text in texts))
    return ItemTexts(texts=full, prompt=options.prompt, keys=tuple(keys), source=file)

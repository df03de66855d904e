"""Read side of a prepared dataset: a directory of memory-mapped CSR arrays plus id maps.

Histories are stored as CSR (``offsets`` into flat ``items``/``timestamps``) so that a dataset
with billions of interactions opens instantly and costs no RAM until rows are touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from persrec.data.schema import DataValidationError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
OFFSETS_FILE = "offsets.npy"
ITEMS_FILE = "items.npy"
TIMESTAMPS_FILE = "timestamps.npy"
ITEM_IDS_FILE = "item_ids.parquet"
USER_IDS_FILE = "user_ids.parquet"
ITEM_TABLE_FILE = "items.parquet"
STORE_FILES = frozenset(
    {MANIFEST_FILE, OFFSETS_FILE, ITEMS_FILE, TIMESTAMPS_FILE, ITEM_IDS_FILE, USER_IDS_FILE, ITEM_TABLE_FILE}
)
"""Every file name ``prepare`` may write into a dataset directory."""
DATASET_FORMAT = "persrec-prepared-dataset"
"""Value of the manifest's ``format`` field: marks a directory that ``prepare`` wrote (and may replace)."""

OFFSETS_DTYPE = np.dtype(np.int64)
ITEMS_DTYPE = np.dtype(np.int32)
TIMESTAMPS_DTYPE = np.dtype(np.int64)
PAD_ITEM = 0
"""Item index 0 is reserved for padding and never stored; real items are 1..num_items."""

MANIFEST_KEYS = (
    "format_version",
    "num_users",
    "num_items",
    "num_interactions",
    "max_history",
    "has_item_table",
)

# Full scans over memory-mapped arrays go in chunks so RAM use stays flat for any dataset size.
SCAN_CHUNK = 1 << 24


def read_manifest(path: Path) -> dict[str, Any]:
    """Load and sanity-check ``manifest.json`` of a prepared dataset directory."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise DataValidationError(f"{file}: missing; {path} is not a prepared dataset")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise DataValidationError(f"{file}: expected a JSON object")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise DataValidationError(f"{file}: missing key(s) {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataValidationError(
            f"{file}: format_version {manifest['format_version']} is not supported (expected {FORMAT_VERSION}); "
            "prepare the dataset again"
        )
    return manifest


def _load_array(path: Path, dtype: np.dtype, length: int) -> np.ndarray:
    if not path.is_file():
        raise DataValidationError(f"{path}: missing")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataValidationError(f"{path}: not a readable .npy array ({exc})") from exc
    if arr.dtype != dtype:
        raise DataValidationError(f"{path}: dtype is {arr.dtype}, expected {dtype}")
    if arr.shape != (length,):
        raise DataValidationError(f"{path}: shape is {arr.shape}, expected ({length},) from {MANIFEST_FILE}")
    return arr


def _chunks(n: int, size: int = SCAN_CHUNK) -> range:
    return range(0, n, size)


def _check_offsets(path: Path, offsets: np.ndarray, num_interactions: int) -> int:
    """Validate CSR offsets and return the longest history."""
    if offsets[0] != 0:
        raise DataValidationError(f"{path}: offsets[0] is {offsets[0]}, expected 0")
    if offsets[-1] != num_interactions:
        raise DataValidationError(
            f"{path}: offsets[-1] is {offsets[-1]}, expected num_interactions={num_interactions}"
        )
    longest = 0
    for start in _chunks(len(offsets) - 1):
        diffs = np.diff(offsets[start : start + SCAN_CHUNK + 1])
        if diffs.size and diffs.min() < 0:
            bad = start + int(np.argmax(diffs < 0))
            raise DataValidationError(
                f"{path}: offsets are not non-decreasing (offsets[{bad}]={offsets[bad]} > "
                f"offsets[{bad + 1}]={offsets[bad + 1]})"
            )
        if diffs.size:
            longest = max(longest, int(diffs.max()))
    return longest


def _check_item_range(path: Path, items: np.ndarray, num_items: int) -> None:
    for start in _chunks(len(items)):
        chunk = items[start : start + SCAN_CHUNK]
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 1 or hi > num_items:
            bad = start + int(np.argmax((chunk < 1) | (chunk > num_items)))
            raise DataValidationError(
                f"{path}: item id {int(items[bad])} at position {bad} is outside [1, {num_items}]"
            )


def _check_time_order(path: Path, offsets: np.ndarray, timestamps: np.ndarray) -> None:
    """Every history must be in time order: a timestamp may only drop where a new user starts.

    Training takes "the last item" to mean "the latest", so an unsorted history would silently
    leak the future into the inputs. Scanned in chunks, like the other full checks.
    """
    n = len(timestamps)
    for start in _chunks(max(n - 1, 0), SCAN_CHUNK):
        stop = min(start + SCAN_CHUNK, n - 1)  # compares pairs (k, k + 1) for start <= k < stop
        chunk = np.asarray(timestamps[start : stop + 1])
        drops = np.flatnonzero(chunk[1:] < chunk[:-1]) + start + 1
        if not drops.size:
            continue
        # The user starts inside this chunk: offsets with values in [start + 1, stop].
        lo = int(np.searchsorted(offsets, start + 1, side="left"))
        hi = int(np.searchsorted(offsets, stop, side="right"))
        bad = drops[~np.isin(drops, np.asarray(offsets[lo:hi]))]
        if bad.size:
            pos = int(bad[0])
            user = int(np.searchsorted(offsets, pos, side="right")) - 1
            raise DataValidationError(
                f"{path / TIMESTAMPS_FILE}: timestamps of user_idx {user}{_user_label(path, user)} are not sorted "
                f"(history position {pos - int(offsets[user])}: {int(timestamps[pos])} after "
                f"{int(timestamps[pos - 1])}); prepare the dataset again"
            )


def _user_label(path: Path, user: int) -> str:
    """`` (user id X)`` from the id map, or nothing when the map cannot tell (it is checked later)."""
    try:
        table = pq.read_table(path / USER_IDS_FILE, filters=[("user_idx", "=", user)], columns=["user_id"])
        return f" (user id {table.column(0)[0].as_py()!r})" if table.num_rows else ""
    except (pa.ArrowException, OSError, KeyError):
        return ""


def _check_id_map(path: Path, idx_col: str, id_col: str, rows: int) -> None:
    if not path.is_file():
        raise DataValidationError(f"{path}: missing")
    try:
        meta = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataValidationError(f"{path}: not a readable parquet file ({exc})") from exc
    names = meta.schema_arrow.names
    for col in (idx_col, id_col):
        if col not in names:
            raise DataValidationError(f"{path}: missing column '{col}'")
    if meta.metadata.num_rows != rows:
        raise DataValidationError(f"{path}: has {meta.metadata.num_rows} rows, expected {rows}")


class PreparedDataset:
    """A prepared dataset opened read-only; arrays are memory-mapped, never loaded whole."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        offsets: np.ndarray,
        items: np.ndarray,
        timestamps: np.ndarray,
    ) -> None:
        self._path = Path(path)
        self._manifest = manifest
        self._offsets = offsets
        self._items = items
        self._timestamps = timestamps

    @classmethod
    def open(cls, path: str | Path, *, full_check: bool = True) -> PreparedDataset:
        """Open and validate a prepared dataset.

        ``full_check`` also scans every stored item id and timestamp (chunked, a few hundred MB/s):
        ids must be in range and each history in time order. Turn it off to open huge datasets
        instantly when the store is trusted.
        """
        path = Path(path)
        if not path.is_dir():
            raise DataValidationError(f"{path}: not a prepared dataset directory")
        manifest = read_manifest(path)
        num_users = int(manifest["num_users"])
        num_items = int(manifest["num_items"])
        n = int(manifest["num_interactions"])
        offsets = _load_array(path / OFFSETS_FILE, OFFSETS_DTYPE, num_users + 1)
        items = _load_array(path / ITEMS_FILE, ITEMS_DTYPE, n)
        timestamps = _load_array(path / TIMESTAMPS_FILE, TIMESTAMPS_DTYPE, n)
        longest = _check_offsets(path / OFFSETS_FILE, offsets, n)
        if longest != int(manifest["max_history"]):
            raise DataValidationError(
                f"{path / OFFSETS_FILE}: longest history is {longest} but {MANIFEST_FILE} says "
                f"max_history={manifest['max_history']}"
            )
        if full_check:
            _check_item_range(path / ITEMS_FILE, items, num_items)
            _check_time_order(path, offsets, timestamps)
        _check_id_map(path / ITEM_IDS_FILE, "item_idx", "item_id", num_items)
        _check_id_map(path / USER_IDS_FILE, "user_idx", "user_id", num_users)
        if manifest["has_item_table"]:
            _check_id_map(path / ITEM_TABLE_FILE, "item_idx", "item_id", num_items)
        return cls(path, manifest, offsets, items, timestamps)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def num_users(self) -> int:
        return int(self._manifest["num_users"])

    @property
    def num_items(self) -> int:
        """Number of real items; valid item indices are 1..num_items (0 is padding)."""
        return int(self._manifest["num_items"])

    @property
    def num_interactions(self) -> int:
        return int(self._manifest["num_interactions"])

    @property
    def max_history(self) -> int:
        return int(self._manifest["max_history"])

    @property
    def offsets(self) -> np.ndarray:
        return self._offsets

    @property
    def items(self) -> np.ndarray:
        return self._items

    @property
    def timestamps(self) -> np.ndarray:
        return self._timestamps

    def __len__(self) -> int:
        return self.num_users

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle by path (e.g. for spawned DataLoader workers); pickling a memmap would copy the data.
        return (_reopen, (str(self._path),))

    def lengths(self) -> np.ndarray:
        """History length per user (int64, shape [num_users])."""
        return np.diff(self._offsets).astype(np.int64, copy=False)

    def _span(self, user_idx: int) -> slice:
        u = int(user_idx)
        if not 0 <= u < self.num_users:
            raise IndexError(f"user index {user_idx} out of range [0, {self.num_users})")
        return slice(int(self._offsets[u]), int(self._offsets[u + 1]))

    def history(self, user_idx: int) -> np.ndarray:
        """Item indices of one user in time order (a read-only view into the memory map)."""
        return self._items[self._span(user_idx)]

    def history_timestamps(self, user_idx: int) -> np.ndarray:
        """Epoch seconds aligned with ``history(user_idx)``."""
        return self._timestamps[self._span(user_idx)]

    def item_id_map(self) -> pa.Table:
        """``item_idx`` (1..num_items) -> original ``item_id``; row r holds item_idx r + 1."""
        return pq.read_table(self._path / ITEM_IDS_FILE)

    def user_id_map(self) -> pa.Table:
        """``user_idx`` (0..num_users-1) -> original ``user_id``."""
        return pq.read_table(self._path / USER_IDS_FILE)

    def item_table(self) -> pa.Table | None:
        """Item attributes aligned with ``item_idx``, or None when no item table was prepared."""
        if not self._manifest["has_item_table"]:
            return None
        return pq.read_table(self._path / ITEM_TABLE_FILE)

    def item_frequencies(self) -> np.ndarray:
        """Interaction count per item index, shape [num_items + 1] (index 0, padding, is 0)."""
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for start in _chunks(self.num_interactions):
            counts += np.bincount(self._items[start : start + SCAN_CHUNK], minlength=self.num_items + 1)
        return counts

    def __repr__(self) -> str:
        return (
            f"PreparedDataset(path='{self._path}', users={self.num_users}, items={self.num_items}, "
            f"interactions={self.num_interactions}, max_history={self.max_history})"
        )


def _reopen(path: str) -> PreparedDataset:
    return PreparedDataset.open(path, full_check=False)

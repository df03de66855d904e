"""The identity of a prepared dataset, recorded with every model trained on it.

A model's item ids are dense indices into one dataset's item id map; scoring it on another dataset with the
same item count gives metrics without a word of warning. The fingerprint (counts, a hash of the manifest
without its source paths, and a hash of the item id map's bytes) travels with checkpoints and `best/`, and is
compared whenever weights meet a dataset.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from persrec.data.schema import DataValidationError
from persrec.data.store import ITEM_IDS_FILE, PreparedDataset

# Where the input came from (paths, sizes, mtimes) says nothing about the content: a copy prepared from a
# moved file is the same dataset.
_VOLATILE_MANIFEST_KEYS = {"source"}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (files may be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(store: PreparedDataset) -> dict[str, Any]:
    manifest = {k: v for k, v in store.manifest.items() if k not in _VOLATILE_MANIFEST_KEYS}
    return {
        "path": str(store.path.resolve()),
        "num_users": store.num_users,
        "num_items": store.num_items,
        "num_interactions": store.num_interactions,
        "manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
        "item_id_map_sha256": sha256_file(store.path / ITEM_IDS_FILE),
    }


def fingerprint_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The identity fields that differ (the path is informative only, never compared)."""
    return [
        key
        for key in ("num_users", "num_items", "num_interactions", "manifest_sha256", "item_id_map_sha256")
        if key in recorded and recorded[key] != current.get(key)
    ]


def require_same_dataset(
    recorded: dict[str, Any] | None, current: dict[str, Any], what: str, *, allow: bool = False
) -> None:
    """Refuse to put weights trained on one dataset together with another (unless explicitly allowed)."""
    if recorded is None or allow:
        return
    differs = fingerprint_mismatch(recorded, current)
    if differs:
        raise DataValidationError(
            f"{what} was trained on {recorded.get('path')} ({recorded.get('num_items')} items, "
            f"{recorded.get('num_users')} users) but the dataset given is {current['path']} "
            f"({current['num_items']} items, {current['num_users']} users), which differs in "
            f"{', '.join(differs)}; pass --allow_dataset_mismatch true to use it anyway"
        )

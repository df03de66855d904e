"""A trained model as serving sees it: the files of `best/` (or any directory `save_model_files` wrote).

Serving needs only the model directory: `model.safetensors`, `config.yaml`, `dataset.json` (item and user
counts) and `item_ids.parquet` (dense index -> original item id). `user_ids.parquet` is used when present
(models with per-user expert tokens). The prepared dataset is never opened.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from persrec.config import Config, ConfigError, load_config
from persrec.data.fingerprint import sha256_file
from persrec.data.store import ITEM_IDS_FILE, USER_IDS_FILE

WEIGHTS_FILE = "model.safetensors"
REQUIRED_FILES = (WEIGHTS_FILE, "config.yaml", "dataset.json", ITEM_IDS_FILE)


def find_model_dir(path: Path) -> Path:
    """`path` itself when it holds the model files, else its `best/` (a run directory)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; expected a run directory or its best/ directory")
    for candidate in (path, path / "best"):
        if (candidate / WEIGHTS_FILE).is_file():
            missing = [name for name in REQUIRED_FILES if not (candidate / name).is_file()]
            if missing:
                raise ConfigError(
                    f"{candidate} lacks {', '.join(missing)}; serving needs {', '.join(REQUIRED_FILES)} "
                    "(what training writes into best/)"
                )
            return candidate
    raise ConfigError(f"{path} holds no {WEIGHTS_FILE}, nor does {path / 'best'}; expected a run directory")


def _read_id_column(path: Path, idx_col: str, id_col: str, first: int) -> list[Any]:
    """Original ids in dense-index order (index `first` first); the map must cover its range exactly once."""
    try:
        table = pq.read_table(path, columns=[idx_col, id_col])
    except (pa.ArrowException, OSError, KeyError) as error:
        raise ConfigError(f"{path} is not an id map with columns {idx_col}, {id_col} ({error})") from error
    order = table.column(idx_col).to_pylist()
    ids = table.column(id_col).to_pylist()
    if sorted(order) != list(range(first, len(order) + first)):
        raise ConfigError(f"{path}: column {idx_col} must number the rows {first}..{len(order) + first - 1}")
    dense = [None] * len(order)
    for index, original in zip(order, ids, strict=True):
        dense[index - first] = original
    return dense


@dataclass
class ModelFiles:
    directory: Path
    config: Config
    dataset: dict[str, Any]
    item_ids: list[Any]  # item_ids[i - 1] is the original id of dense item i
    user_ids: list[Any] | None  # user_ids[u] is the original id of training user u
    fingerprint: str

    @classmethod
    def open(cls, path: Path) -> ModelFiles:
        directory = find_model_dir(path)
        config = load_config([directory / "config.yaml"])
        try:
            dataset = json.loads((directory / "dataset.json").read_text())
            num_items = int(dataset["num_items"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(
                f"{directory / 'dataset.json'} does not hold a dataset fingerprint ({error})"
            ) from error
        item_ids = _read_id_column(directory / ITEM_IDS_FILE, "item_idx", "item_id", 1)
        if len(item_ids) != num_items:
            raise ConfigError(
                f"{directory / ITEM_IDS_FILE} maps {len(item_ids)} items but dataset.json says {num_items}"
            )
        users = directory / USER_IDS_FILE
        user_ids = _read_id_column(users, "user_idx", "user_id", 0) if users.is_file() else None
        # The weights and the config that shaped them: caches made by anything else are never used.
        fingerprint = hashlib.sha256(
            (sha256_file(directory / WEIGHTS_FILE) + sha256_file(directory / "config.yaml")).encode()
        ).hexdigest()
        return cls(directory, config, dataset, item_ids, user_ids, fingerprint)

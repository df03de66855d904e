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
import torch

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
    weights_sha256: str

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
        weights_sha256 = sha256_file(directory / WEIGHTS_FILE)
        fingerprint = hashlib.sha256(
            (weights_sha256 + sha256_file(directory / "config.yaml")).encode()
        ).hexdigest()
        return cls(directory, config, dataset, item_ids, user_ids, fingerprint, weights_sha256)


def serving_model(files: ModelFiles) -> torch.nn.Module:
    """The model `files` describe, with their weights, in the form serving runs.

    A trainable item LLM only turns item texts into item vectors, and serving reads and ranks vectors only:
    when its run saved the vectors of its final evaluation (`item_table.safetensors`), the model is built with
    that table in place of the item LLM, so neither the item model's directory nor the item texts are needed.
    """
    from dataclasses import replace

    from persrec.models.hllm import ITEM_TABLE_FILE
    from persrec.train.build import build_model
    from persrec.train.checkpoint import load_state, read_weights

    config = files.config
    num_users = int(files.dataset.get("num_users") or 0)
    weights = files.directory / WEIGHTS_FILE
    table_file = files.directory / ITEM_TABLE_FILE
    table = _item_table(table_file, files.weights_sha256) if config.item_llm_trainable else None
    if table is None:
        model = build_model(config, len(files.item_ids), num_users, model_dir=files.directory)
        load_state(model, read_weights(weights), weights)
        return model
    model = build_model(
        replace(config, item_llm_trainable=False), len(files.item_ids), num_users, model_dir=files.directory
    )
    state = {key: value for key, value in read_weights(weights).items() if ".item_encoder." not in key}
    (table_key,) = [key for key in model.state_dict() if key.endswith("item_table")]
    state[table_key] = table
    load_state(model, state, weights)
    return model


def _item_table(path: Path, weights_sha256: str) -> torch.Tensor | None:
    """The saved item table when it was computed with these weights; None when absent or from other weights
    (a run that found a better model after writing it, or was stopped before its final evaluation)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as table_file:
            recorded = (table_file.metadata() or {}).get("weights_sha256")
            table = table_file.get_tensor("item_table")
    except Exception as error:  # noqa: BLE001 - any damage to the file is the same mistake for the user
        raise ConfigError(f"{path} is not a readable item table ({error})") from error
    return table if recorded == weights_sha256 else None

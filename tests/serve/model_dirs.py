"""Model directories with random weights, written by the same functions training uses for best/."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from persrec.config import load_config
from persrec.data.store import ITEM_IDS_FILE
from persrec.train.build import build_model
from persrec.train.checkpoint import save_model_files, save_weights

NUM_ITEMS = 30
# Original ids that are not the dense indices, so a missing translation cannot pass unnoticed.
ITEM_IDS = [f"m{1000 + 7 * i}" for i in range(NUM_ITEMS)]
NUM_USERS = 5

SHAPES = {
    "HSTU": {"model": "HSTU"},
    "SASRec": {"model": "SASRec"},
    "PersonalizedHSTU": {
        "model": "PersonalizedHSTU",
        "number_of_user_tokens": 2,
        "pretrain_item_num": 8,
        "recent_item_num": 6,
        "relative_position_bias": True,
        "relative_time_bias": True,
    },
    "PersonalizedSASRec": {
        "model": "PersonalizedSASRec",
        "number_of_user_tokens": 2,
        "pretrain_item_num": 8,
        "recent_item_num": 6,
        "per_user_expert_tokens": True,
    },
    # A Hugging Face decoder (a tiny Llama) over item ids, with and without experts.
    "LLaMAID": {"model": "LLaMAID"},
    "PersonalizedLLaMAID": {
        "model": "PersonalizedLLaMAID",
        "number_of_user_tokens": 2,
        "insert_method": "[[4, 1], [8, 1]]",
        "pretrain_item_num": 8,
        "recent_item_num": 6,
    },
}


def write_model_dir(root: Path, shape: str = "PersonalizedHSTU", seed: int = 0, **extra: object) -> Path:
    """root/best with random weights of a tiny `shape` model (window 14) over ITEM_IDS."""
    overrides = {
        "MAX_ITEM_LIST_LENGTH": 14,
        "n_layers": 2,
        "n_heads": 2,
        "item_embedding_size": 16,
        "hidden_dropout_prob": 0.0,
        **SHAPES[shape],
        **extra,
    }
    config = load_config(None, overrides)
    dataset = root / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"item_idx": pa.array(range(1, NUM_ITEMS + 1), pa.int32()), "item_id": ITEM_IDS}),
        dataset / ITEM_IDS_FILE,
    )
    pq.write_table(
        pa.table(
            {
                "user_idx": pa.array(range(NUM_USERS), pa.int32()),
                "user_id": [f"u{i}" for i in range(NUM_USERS)],
            }
        ),
        dataset / "user_ids.parquet",
    )
    fingerprint = {
        "path": str(dataset),
        "num_users": NUM_USERS,
        "num_items": NUM_ITEMS,
        "num_interactions": 100,
        "manifest_sha256": "0" * 64,
        "item_id_map_sha256": hashlib.sha256((dataset / ITEM_IDS_FILE).read_bytes()).hexdigest(),
    }
    torch.manual_seed(seed)
    model = build_model(config, NUM_ITEMS, NUM_USERS)
    with torch.no_grad():  # trained-looking parameters: zero-initialised tables would hide mistakes
        for name, parameter in model.named_parameters():
            if "per_user" in name or "bias" in name:
                parameter.normal_(std=0.3)
    best = root / "best"
    save_model_files(best, config, fingerprint, dataset, model)
    save_weights(model, best / "model.safetensors")
    return best

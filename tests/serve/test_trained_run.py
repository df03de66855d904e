"""A run trained by persrec serves from its directory alone, with the dataset's original ids."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

import persrec
from persrec.config import load_config
from persrec.data.store import PreparedDataset
from persrec.train.distributed import DistributedContext
from persrec.train.trainer import Trainer
from tests.conftest import tiny_overrides


def test_a_trained_run_recommends_in_original_ids(tiny_dataset, tmp_path):
    overrides = tiny_overrides(tiny_dataset, tmp_path, epochs=1)
    overrides |= {
        "model": "PersonalizedHSTU",
        "number_of_user_tokens": 2,
        "pretrain_item_num": 10,
        "recent_item_num": 6,
        "per_user_expert_tokens": True,
    }
    trainer = Trainer(load_config(overrides=overrides), DistributedContext())
    result = trainer.fit()
    best = result.best_checkpoint
    assert (best / "user_ids.parquet").is_file()  # per-user tokens travel with the weights
    rec = persrec.load_recommender(tmp_path / "run")
    store = PreparedDataset.open(tiny_dataset)
    item_ids = pq.read_table(tiny_dataset / "item_ids.parquet").column("item_id").to_pylist()
    user_ids = pq.read_table(tiny_dataset / "user_ids.parquet").column("user_id").to_pylist()
    user = 3
    dense = store.history(user)
    times = store.history_timestamps(user).tolist()
    history = [item_ids[i - 1] for i in dense]
    got = rec.user_embedding(history, times, user=user_ids[user])
    window = torch.from_numpy(np.asarray(dense[-16:], dtype=np.int64))
    stamps = torch.from_numpy(np.asarray(times[-16:], dtype=np.int64))
    pad = 16 - len(window)
    batch = {
        "input_ids": F.pad(window, (pad, 0))[None],
        "timestamps": F.pad(stamps, (pad, 0))[None],
        "user": torch.tensor([user]),
    }
    trainer.model.eval()
    with torch.no_grad():
        expected = F.normalize(trainer.model.user_embeddings(batch), dim=-1)[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    top = rec.recommend(history, k=5, timestamps=times, user=user_ids[user])
    assert len(top.items) == 5 and set(top.items) <= set(item_ids) and not set(top.items) & set(history)

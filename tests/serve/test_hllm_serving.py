"""HLLM serves like every backbone: from its run directory alone (the item model may be gone), in original ids,
through the Python API and the HTTP server, with the expert cache equal to the full masked pass."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import persrec
from persrec.config import load_config
from persrec.data.store import PreparedDataset
from persrec.train.distributed import DistributedContext
from persrec.train.trainer import Trainer
from tests.hf.test_hllm import hllm_overrides
from tests.hf.tiny_models import tiny_bert_dir, tiny_llama_dir

USER = 3


def _trained(tiny_dataset, tmp_path, trainable: bool) -> tuple[Trainer, object]:
    item_dir = (tiny_llama_dir if trainable else tiny_bert_dir)(tmp_path / "item-model")
    extra = {"item_llm_trainable": True, "item_emb_token_n": 1} if trainable else {"item_emb_token_n": 0}
    trainer = Trainer(
        load_config(overrides=hllm_overrides(tiny_dataset, tmp_path, item_dir, **extra)), DistributedContext()
    )
    best = trainer.fit().best_checkpoint
    shutil.rmtree(item_dir)  # serving needs only the run directory
    return trainer, best


def _expected_embedding(trainer: Trainer, dense: np.ndarray, times: np.ndarray) -> torch.Tensor:
    """The evaluator's user embedding of the latest window (the full masked pass, no cache)."""
    length = trainer.config.MAX_ITEM_LIST_LENGTH
    window, stamps = torch.tensor(dense[-length:]), torch.tensor(times[-length:])
    pad = length - len(window)
    batch = {"input_ids": F.pad(window, (pad, 0))[None], "timestamps": F.pad(stamps, (pad, 0))[None]}
    trainer.model.eval()
    with torch.no_grad():
        return F.normalize(trainer.model.user_embeddings(batch, use_cache=False), dim=-1)[0]


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen-item-llm", "trainable-item-llm"])
def test_hllm_recommends_from_its_run_directory(tiny_dataset, tmp_path, trainable):
    trainer, best = _trained(tiny_dataset, tmp_path, trainable)
    rec = persrec.load_recommender(best)
    store = PreparedDataset.open(tiny_dataset)
    item_ids = pq.read_table(tiny_dataset / "item_ids.parquet").column("item_id").to_pylist()
    dense = np.asarray(store.history(USER), dtype=np.int64)
    times = np.asarray(store.history_timestamps(USER), dtype=np.int64)
    history = [item_ids[i - 1] for i in dense]
    got = rec.user_embedding(history, times.tolist())
    expected = _expected_embedding(trainer, dense, times)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    # Item vectors come from the saved weights: the same table the trained model ranks with.
    with torch.no_grad():
        table = F.normalize(trainer.model.item_embeddings().float(), dim=-1)[1:]
    ids, vectors = rec.item_embeddings()
    assert ids == item_ids
    np.testing.assert_allclose(vectors, table.numpy(), atol=1e-5)
    top = rec.recommend(history, k=5, timestamps=times.tolist())
    scores = dict(zip(item_ids, (table @ expected).tolist(), strict=True))
    unseen = sorted((score for item, score in scores.items() if item not in set(history)), reverse=True)
    assert top.scores == pytest.approx(unseen[:5], abs=1e-5)  # the best unseen items (ties in any order)
    assert [scores[item] for item in top.items] == pytest.approx(top.scores, abs=1e-5)
    assert not set(top.items) & set(history)


def test_hllm_serves_over_http_with_its_expert_cache(tiny_dataset, tmp_path):
    from fastapi.testclient import TestClient

    from persrec.serve.http_app import create_app
    from persrec.serve.live import LiveRecommender
    from persrec.serve.store import open_store

    _, best = _trained(tiny_dataset, tmp_path, trainable=False)
    rec = persrec.load_recommender(best, refresh_every=2)
    item_ids = pq.read_table(tiny_dataset / "item_ids.parquet").column("item_id").to_pylist()
    history, times = item_ids[:7], list(range(7))
    app = create_app(LiveRecommender(rec, open_store(f"{tmp_path}/cache.db")))
    with TestClient(app) as client:
        for item, stamp in zip(history, times, strict=True):
            assert client.post(
                "/events", json={"user_id": "u", "items": [item], "timestamps": [stamp]}
            ).is_success
        answers = [client.post("/recommend", json={"user_id": "u", "k": 4}).json() for _ in range(2)]
    expected = rec.recommend(history, k=4, timestamps=times)
    for answer in answers:
        assert answer["items"] == expected.items
        assert answer["scores"] == pytest.approx(expected.scores, abs=1e-5)
    assert answers[1]["cache"] == "hit"


def test_an_item_table_of_other_weights_is_never_used(tiny_dataset, tmp_path):
    from safetensors.torch import load_file, save_file

    from persrec.config import ConfigError

    _, best = _trained(tiny_dataset, tmp_path, trainable=True)
    assert (best / "item_table.safetensors").is_file()
    persrec.load_recommender(best)  # served from the table
    weights = load_file(str(best / "model.safetensors"))
    save_file({key: value + 0.01 for key, value in weights.items()}, str(best / "model.safetensors"))
    # The table no longer matches the weights: serving needs the item LLM and texts again, which are gone.
    with pytest.raises(ConfigError, match="item texts"):
        persrec.load_recommender(best)

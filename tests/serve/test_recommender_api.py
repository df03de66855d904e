"""load_recommender: original ids in and out, the policy's window against the full masked pass, batching."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import persrec
from persrec.config import ConfigError
from tests.serve.model_dirs import ITEM_IDS, SHAPES

EXPERT_SHAPES = [s for s in SHAPES if s.startswith("Personalized")]


def _history(length: int, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    items = [rng.choice(ITEM_IDS) for _ in range(length)]
    return items, sorted(rng.randrange(10**6) for _ in range(length))


def _full_pass_scores(rec, items: list[str], times: list[int], user: str | None) -> torch.Tensor:
    """Cosine scores from the full masked forward over the window the policy describes (no cache involved)."""
    encoded = rec.encode(items, times)
    with torch.no_grad():
        if not rec.is_expert:
            window = torch.zeros(1, rec.window, dtype=torch.long)
            stamps = torch.zeros(1, rec.window, dtype=torch.long)
            tail = torch.from_numpy(encoded.items[-rec.window :])
            window[0, -len(tail) :] = tail
            stamps[0, -len(tail) :] = torch.from_numpy(encoded.timestamps[-rec.window :])
            hidden = rec.model.backbone(window, stamps)[:, -1]
        else:
            plan = rec.policy.plan(len(encoded.items))
            ids = np.concatenate([plan.history_part(encoded.items), plan.recent_part(encoded.items)])
            ts = np.concatenate([plan.history_part(encoded.timestamps), plan.recent_part(encoded.timestamps)])
            users = torch.tensor([rec.user_index(user)])
            states = rec.model.model.item_hidden_states(
                torch.from_numpy(ids)[None], torch.from_numpy(ts)[None], users
            )
            hidden = states[:, plan.history_length + plan.query_slot]
        items_matrix = F.normalize(rec.model.item_embeddings().float(), dim=-1)
        return (F.normalize(hidden, dim=-1) @ items_matrix.T)[0]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("refresh_every", [1, 4])
@pytest.mark.parametrize("length", [3, 6, 11, 23])
def test_recommend_scores_equal_the_full_masked_pass(model_dirs, shape, refresh_every, length):
    rec = persrec.load_recommender(model_dirs[shape], refresh_every=refresh_every)
    items, times = _history(length, seed=length)
    got = rec.recommend(items, k=len(ITEM_IDS), timestamps=times, exclude_seen=False, user="u2")
    expected = _full_pass_scores(rec, items, times, "u2")
    dense = [ITEM_IDS.index(item) + 1 for item in got.items]
    torch.testing.assert_close(torch.tensor(got.scores), expected[dense], atol=1e-5, rtol=1e-5)
    assert got.scores == sorted(got.scores, reverse=True)
    assert sorted(got.items) == sorted(ITEM_IDS)  # every item once, in original ids


@pytest.mark.parametrize("shape", EXPERT_SHAPES)
def test_refresh_every_one_matches_the_evaluators_user_embeddings(model_dirs, shape):
    """N = 1 is the evaluator's left-padded window of the last W items, scored by the recommender's own path."""
    rec = persrec.load_recommender(model_dirs[shape])
    items, times = _history(23)
    encoded = rec.encode(items, times)
    batch = {
        "input_ids": torch.from_numpy(encoded.items[-14:])[None],
        "timestamps": torch.from_numpy(encoded.timestamps[-14:])[None],
        "user": torch.tensor([rec.user_index("u1")]),
    }
    with torch.no_grad():
        expected = F.normalize(rec.model.user_embeddings(batch, use_cache=False), dim=-1)[0]
    got = rec.user_embedding(items, times, user="u1")
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def test_unknown_items_are_reported_and_skipped(model_dirs):
    rec = persrec.load_recommender(model_dirs["PersonalizedHSTU"])
    items, times = _history(9)
    mixed = items[:4] + ["nope-1"] + items[4:] + ["nope-2"]
    mixed_times = times[:4] + [times[3]] + times[4:] + [times[-1]]
    clean = rec.recommend(items, k=5, timestamps=times)
    dirty = rec.recommend(mixed, k=5, timestamps=mixed_times)
    assert (dirty.unknown_count, dirty.unknown_examples) == (2, ["nope-1", "nope-2"])
    assert dirty.items == clean.items and dirty.scores == pytest.approx(clean.scores)
    empty = rec.recommend(["nope"], timestamps=[1])
    assert empty.items == [] and empty.unknown_count == 1


def test_exclude_seen_and_batch_equals_single_calls(model_dirs):
    rec = persrec.load_recommender(model_dirs["PersonalizedSASRec"], refresh_every=2)
    histories = [_history(n, seed=n)[0] for n in (2, 7, 15)]
    users = ["u0", "u3", "someone new"]
    batch = rec.recommend_batch(histories, k=8, users=users)
    for history, user, result in zip(histories, users, batch, strict=True):
        single = rec.recommend(history, k=8, user=user)
        assert result.items == single.items
        assert result.scores == pytest.approx(single.scores, abs=1e-5)
        assert not set(result.items) & set(history)
    with_seen = rec.recommend(histories[2], k=len(ITEM_IDS), exclude_seen=False)
    assert set(histories[2]) <= set(with_seen.items)


def test_per_user_tokens_follow_the_user_id(model_dirs):
    rec = persrec.load_recommender(model_dirs["PersonalizedSASRec"])
    items, _ = _history(12)
    known = rec.user_embedding(items, user="u1")
    assert not np.allclose(known, rec.user_embedding(items, user="u4"))
    np.testing.assert_allclose(
        rec.user_embedding(items, user="stranger"), rec.user_embedding(items), atol=1e-6
    )


def test_embeddings_reproduce_the_scores(model_dirs):
    rec = persrec.load_recommender(model_dirs["HSTU"])
    items, times = _history(10)
    ids, vectors = rec.item_embeddings()
    assert ids == ITEM_IDS and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    result = rec.recommend(items, k=3, timestamps=times, exclude_seen=False)
    scores = vectors @ rec.user_embedding(items, times)
    np.testing.assert_allclose(sorted(scores, reverse=True)[:3], result.scores, atol=1e-5)
    assert [ids[i] for i in np.argsort(-scores)[:3]] == result.items


def test_mistakes_name_what_to_fix(model_dirs, tmp_path):
    rec = persrec.load_recommender(model_dirs["PersonalizedHSTU"])
    with pytest.raises(ValueError, match="pass timestamps"):
        rec.recommend(ITEM_IDS[:3])
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 30\]"):
        rec.recommend(ITEM_IDS[:3], k=0, timestamps=[1, 2, 3])
    with pytest.raises(ConfigError, match="does not exist"):
        persrec.load_recommender(tmp_path / "missing")
    with pytest.raises(ConfigError, match="refresh_every must lie in"):
        persrec.load_recommender(model_dirs["PersonalizedHSTU"], refresh_every=7)
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="lacks config.yaml, dataset.json, item_ids.parquet"):
        persrec.load_recommender(tmp_path)


def test_numeric_ids_accept_text(tmp_path):
    """Ids given as text (the command line, a URL) find the integer ids of the map, and vice versa."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.serve.model_dirs import write_model_dir

    best = write_model_dir(tmp_path, "SASRec")
    pq.write_table(
        pa.table({"item_idx": pa.array(range(1, 31), pa.int32()), "item_id": list(range(100, 130))}),
        best / "item_ids.parquet",
    )
    rec = persrec.load_recommender(tmp_path)
    assert rec.recommend(["100", "101"], k=3).items == rec.recommend([100, 101], k=3).items
    assert all(isinstance(item, int) for item in rec.recommend([100], k=3).items)

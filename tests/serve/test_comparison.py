"""The quickstart's serving comparison: both paths timed on real users, and their scores agree."""

from __future__ import annotations

import pytest
import torch

from persrec.config import load_config
from persrec.data.store import PreparedDataset
from persrec.serve.comparison import compare_serving
from persrec.train.build import build_model, window_config
from tests.conftest import tiny_overrides


def _expert_model(dataset, tmp_path, model: str, **extra):
    config = load_config(
        overrides=tiny_overrides(
            dataset,
            tmp_path,
            model=model,
            number_of_user_tokens=2,
            pretrain_item_num=10,
            recent_item_num=6,
            **extra,
        )
    )
    store = PreparedDataset.open(dataset)
    torch.manual_seed(0)
    return build_model(config, store.num_items, store.num_users), store, window_config(config)


@pytest.mark.parametrize("model", ["PersonalizedHSTU", "PersonalizedSASRec"])
def test_cached_and_full_paths_agree_on_every_request(tiny_dataset, tmp_path, model):
    recommender, store, window = _expert_model(tiny_dataset, tmp_path, model)
    comparison = compare_serving(recommender, store, window, torch.device("cpu"), requests=12)
    assert comparison.requests == 12
    assert (comparison.window, comparison.recent) == (16, 6)
    assert comparison.max_abs_score_diff <= 1e-5
    assert comparison.full_ms > 0 and comparison.cached_ms > 0 and comparison.compress_ms > 0
    text = comparison.describe()
    assert "expert cache, 6 recent items" in text and "full masked pass over 16 items" in text


def test_the_comparison_sees_a_broken_cache(tiny_dataset, tmp_path, monkeypatch):
    """The agreement figure is measured, not assumed: a cache that loses a layer shows up in it."""
    recommender, store, window = _expert_model(tiny_dataset, tmp_path, "PersonalizedHSTU", n_layers=2)
    original = recommender.compress

    def stale(*args, **kwargs):
        cache = original(*args, **kwargs)
        for values in cache.values:
            values.mul_(0.5)
        return cache

    monkeypatch.setattr(recommender, "compress", stale)
    comparison = compare_serving(recommender, store, window, torch.device("cpu"), requests=4)
    assert comparison.max_abs_score_diff > 1e-3

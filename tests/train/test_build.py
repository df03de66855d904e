"""The user-facing Config reaches the model and the loss with the values that make training work."""

from pathlib import Path

import pytest
import torch

from persrec.config import Config, load_config
from persrec.train.build import build_model, nce_config

CONFIGS = Path(__file__).resolve().parents[2] / "persrec" / "configs"


@pytest.mark.parametrize("model", ["SASRec", "HSTU"])
@pytest.mark.parametrize("std", [0.02, 0.1])
def test_initializer_range_sets_the_item_embedding_std(model, std):
    torch.manual_seed(0)
    recommender = build_model(
        Config(model=model, initializer_range=std, item_embedding_size=64), num_items=5000
    )
    weight = recommender.item_embeddings().detach()
    assert torch.count_nonzero(weight[0]) == 0  # padding row stays zero
    assert weight[1:].std().item() == pytest.approx(std, rel=0.05)


def test_default_loss_draws_negatives_per_sequence():
    # One batch-wide negative set makes ML-1M embeddings collapse (README, reproduction notes).
    assert nce_config(Config()).negatives_per_sequence
    assert not nce_config(Config(negatives_per_sequence=False)).negatives_per_sequence


def test_per_position_negatives_reach_the_loss_and_the_ml1m_configs():
    assert not nce_config(Config()).negatives_per_position
    assert nce_config(Config(negatives_per_position=True)).negatives_per_position
    for name in ("ml1m-sasrec", "ml1m-hstu", "ml1m-hstu-large"):
        config = load_config([CONFIGS / f"{name}.yaml"])
        assert config.negatives_per_position and config.optim_args.max_grad_norm == 0.0

"""The user-facing Config reaches the model and the loss with the values that make training work."""

import pytest
import torch

from persrec.config import Config
from persrec.train.build import build_model, nce_config


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

"""Gradient checkpointing recomputes each block in the backward pass: same loss, same gradients, less memory."""

from __future__ import annotations

import pytest
import torch

from persrec.config import load_config
from persrec.train.build import build_model

MODELS = {
    "SASRec": {"model": "SASRec", "attn_dropout_prob": 0.1},
    "HSTU": {"model": "HSTU", "relative_position_bias": True, "relative_time_bias": True},
    "PersonalizedHSTU": {
        "model": "PersonalizedHSTU",
        "number_of_user_tokens": 2,
        "pretrain_item_num": 12,
        "recent_item_num": 8,
        "item_dropout": 0.2,
    },
    "PersonalizedSASRec": {
        "model": "PersonalizedSASRec",
        "number_of_user_tokens": 2,
        "insert_method": "[[6, 1], [12, 1]]",
        "pretrain_item_num": 12,
        "recent_item_num": 8,
    },
}


def _model(name: str) -> torch.nn.Module:
    overrides = {
        "MAX_ITEM_LIST_LENGTH": 20,
        "n_layers": 3,
        "n_heads": 2,
        "item_embedding_size": 16,
        "hidden_dropout_prob": 0.3,  # the recomputed blocks must draw the same dropout masks
        **MODELS[name],
    }
    torch.manual_seed(0)
    return build_model(load_config(overrides=overrides), num_items=40, num_users=10)


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 41, (4, 20), generator=generator)
    ids[0, :5] = 0  # left padding
    times = torch.cumsum(torch.randint(1, 5000, (4, 20), generator=generator), dim=1)
    return {"input_ids": ids, "target_ids": torch.roll(ids, -1, 1), "timestamps": times}


def _gradients(model: torch.nn.Module, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.backbone.set_gradient_checkpointing(checkpointing)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    queries, targets = model(_batch())
    scores = queries @ model.item_embeddings().T
    loss = torch.nn.functional.cross_entropy(scores[targets > 0], targets[targets > 0])
    loss.backward()
    after = torch.rand(1)  # the RNG continues as if no block had been recomputed
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return torch.cat([loss.detach().view(1), after]), grads


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointed_gradients_equal_the_stored_activation_ones(name):
    model = _model(name)
    plain_loss, plain = _gradients(model, checkpointing=False)
    checkpointed_loss, checkpointed = _gradients(model, checkpointing=True)
    assert torch.equal(plain_loss, checkpointed_loss)
    assert plain.keys() == checkpointed.keys() and len(plain) > 5
    for key in plain:  # the same operations on the same values: equal, not merely close
        assert torch.equal(checkpointed[key], plain[key]), key


def test_checkpointing_keeps_fewer_activations():
    """Tensors saved for the backward pass: a checkpointed pass keeps only each block's inputs."""
    model = _model("SASRec")

    def saved(checkpointing: bool) -> int:
        model.backbone.set_gradient_checkpointing(checkpointing)
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            queries, _ = model(_batch())
        return total

    assert saved(True) < saved(False)


def test_evaluation_never_checkpoints():
    model = _model("HSTU")
    model.backbone.set_gradient_checkpointing(True)
    model.eval()
    with torch.no_grad():
        first = model.user_embeddings(_batch())
    model.backbone.set_gradient_checkpointing(False)
    with torch.no_grad():
        assert torch.equal(first, model.user_embeddings(_batch()))

"""The server scores exactly as the evaluator does, whatever the prediction options and expert tokens."""

import pytest
import torch
import torch.nn.functional as F

from persrec.models import BackboneConfig, build_backbone
from persrec.models.experts import ExpertLayout, ExpertSequenceModel
from persrec.models.recommender import ExpertOptions, ExpertRecommender
from persrec.serve.expert_cache import ExpertServer

USERS = 6


def _recommender(name: str, insertions, full_item_seq: bool, per_user: bool) -> ExpertRecommender:
    torch.manual_seed(0)
    layout = ExpertLayout(window=12, insertions=insertions)
    extra = {"relative_position_bias": True, "relative_time_bias": True} if name == "HSTU" else {}
    config = BackboneConfig(
        num_items=40,
        max_positions=layout.length,
        embedding_dim=16,
        num_layers=2,
        num_heads=2,
        dropout=0.0,
        **extra,
    )
    model = ExpertSequenceModel(build_backbone(name, config), layout, num_users=USERS if per_user else 0)
    with torch.no_grad():
        if per_user:  # trained offsets are non-zero; the zero init would hide a missing user
            model.experts.per_user.weight.normal_()
        if name == "HSTU":
            for layer in model.backbone.layers:
                layer.relative_bias.position_bias.normal_()
                layer.relative_bias.time_bias.normal_()
    options = ExpertOptions(predict_with_full_item_seq=full_item_seq)
    return ExpertRecommender(model, options).eval()


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 41, (USERS, 12), generator=gen)
    ids[0, :5] = 0  # a short user
    times = torch.cumsum(torch.randint(1, 10_000, (USERS, 12), generator=gen), dim=1)
    return {"input_ids": ids, "timestamps": times, "user": torch.arange(USERS)}


def _evaluator_scores(recommender: ExpertRecommender, batch, use_cache: bool) -> torch.Tensor:
    """As persrec.eval.runner scores: user embedding · normalised item embeddings (both normalised)."""
    with torch.no_grad():
        users = F.normalize(recommender.user_embeddings(batch, use_cache=use_cache).float(), dim=-1)
        return users @ F.normalize(recommender.item_embeddings().float(), dim=-1).T


@pytest.mark.parametrize("name", ["SASRec", "HSTU"])
@pytest.mark.parametrize("full_item_seq", [True, False])
@pytest.mark.parametrize("per_user", [False, True])
def test_server_scores_equal_the_evaluators(name, full_item_seq, per_user):
    recommender = _recommender(name, ((8, 3),), full_item_seq, per_user)
    server, batch = ExpertServer(recommender), _batch()
    ids, times = batch["input_ids"], batch["timestamps"]
    users = batch["user"] if per_user else None
    cache = server.compress(ids[:, :8], times[:, :8], users)
    scores = server.predict(cache, ids[:, 8:], times[:, 8:])
    for use_cache in (True, False):
        expected = _evaluator_scores(recommender, batch, use_cache)
        assert (scores[:, 1:] - expected[:, 1:]).abs().max() <= 1e-5
    # the options matter here, so the agreement above is not vacuous
    history_changed = ids.clone()
    history_changed[:, :8] = (history_changed[:, :8] % 40) + 1
    other = server.predict(
        server.compress(history_changed[:, :8], times[:, :8], users), ids[:, 8:], times[:, 8:]
    )
    assert torch.allclose(other, scores, atol=1e-6) != full_item_seq
    if per_user:
        shared = server.predict(server.compress(ids[:, :8], times[:, :8]), ids[:, 8:], times[:, 8:])
        assert (shared[:, 1:] - scores[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("full_item_seq", [True, False])
def test_refresh_with_users_equals_compress_and_the_evaluator(full_item_seq):
    recommender = _recommender("HSTU", ((4, 1), (8, 2)), full_item_seq, per_user=True)
    server, batch = ExpertServer(recommender), _batch()
    ids, times, users = batch["input_ids"], batch["timestamps"], batch["user"]
    cache = server.compress(ids[:, :4], times[:, :4], users, segments=1)
    cache = server.refresh(cache, ids[:, 4:8], times[:, 4:8], users)
    scores = server.predict(cache, ids[:, 8:], times[:, 8:])
    scratch = server.predict(server.compress(ids[:, :8], times[:, :8], users), ids[:, 8:], times[:, 8:])
    assert (scores[:, 1:] - scratch[:, 1:]).abs().max() <= 1e-5
    expected = _evaluator_scores(recommender, batch, use_cache=False)
    assert (scores[:, 1:] - expected[:, 1:]).abs().max() <= 1e-5

"""The serving wrapper returns the same ranking as the evaluator's full masked pass."""

import torch
import torch.nn.functional as F

from persrec.models import BackboneConfig, build_backbone
from persrec.models.experts import ExpertLayout, ExpertSequenceModel
from persrec.models.recommender import ExpertOptions, ExpertRecommender
from persrec.serve.expert_cache import ExpertServer


def _server() -> tuple[ExpertServer, ExpertRecommender]:
    torch.manual_seed(0)
    layout = ExpertLayout(window=12, insertions=((8, 3),))
    config = BackboneConfig(
        num_items=40, max_positions=layout.length, embedding_dim=16, num_layers=2, num_heads=2, dropout=0.0
    )
    recommender = ExpertRecommender(
        ExpertSequenceModel(build_backbone("HSTU", config), layout), ExpertOptions()
    )
    return ExpertServer(recommender), recommender


def test_scores_match_the_full_masked_pass_and_top_k_excludes():
    server, recommender = _server()
    ids = torch.randint(1, 41, (3, 12), generator=torch.Generator().manual_seed(2))
    cache = server.compress(ids[:, :8])
    scores = server.predict(cache, ids[:, 8:])
    with torch.no_grad():
        user = recommender.user_embeddings({"input_ids": ids}, use_cache=False)
        expected = F.normalize(user, dim=-1) @ F.normalize(recommender.item_embeddings(), dim=-1).T
    assert scores.shape == (3, 41) and torch.isinf(scores[:, 0]).all()
    assert (scores[:, 1:] - expected[:, 1:]).abs().max() <= 1e-5
    best = scores.argmax(dim=1)
    values, items = server.top_k(cache, ids[:, 8:], k=5, exclude=best[:, None])
    assert values.shape == (3, 5) and not (items == best[:, None]).any()


def test_short_recent_window_is_left_padded():
    server, _ = _server()
    ids = torch.randint(1, 41, (2, 12), generator=torch.Generator().manual_seed(3))
    cache = server.compress(ids[:, :8])
    padded = ids[:, 8:].clone()
    padded[:, :2] = 0
    torch.testing.assert_close(server.predict(cache, ids[:, 10:]), server.predict(cache, padded))

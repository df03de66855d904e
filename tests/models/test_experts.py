"""Expert tokens: layout validation, the exact mask semantics, and cache serving equal to the full pass."""

import pytest
import torch

from persrec.models import BackboneConfig, build_backbone
from persrec.models.experts import ExpertLayout, ExpertSequenceModel
from persrec.models.recommender import ExpertOptions, ExpertRecommender


def test_mask_matches_the_design_picture():
    # P=4, k=2, R=3: slots i0 i1 i2 i3 e0 e1 i4 i5 i6
    layout = ExpertLayout(window=7, insertions=((4, 2),))
    mask = layout.slot_tables["mask"].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0],  # i3
            [1, 1, 1, 1, 1, 0, 0, 0, 0],  # e0
            [1, 1, 1, 1, 1, 1, 0, 0, 0],  # e1
            [0, 0, 0, 0, 1, 1, 1, 0, 0],  # i4: history only through the experts
            [0, 0, 0, 0, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 1, 1, 1, 1, 1],  # i6
        ]
    )
    assert torch.equal(mask, expected)
    assert layout.slot_tables["item_slots"].tolist() == [0, 1, 2, 3, 6, 7, 8]
    assert layout.slot_tables["expert_slots"].tolist() == [4, 5]


def test_multi_segment_mask():
    # segments: i0 i1 | e0 | i2 i3 | e1 e2 | i4
    layout = ExpertLayout(window=5, insertions=((2, 1), (4, 2)))
    mask = layout.slot_tables["mask"]
    slot = {name: index for index, name in enumerate(["i0", "i1", "e0", "i2", "i3", "e1", "e2", "i4"])}

    def sees(q, k):
        return bool(mask[slot[q], slot[k]])

    assert sees("i2", "e0") and not sees("i2", "i1") and not sees("i2", "i0")
    assert sees("e1", "i2") and sees("e1", "i3") and sees("e1", "e0") and not sees("e1", "i1")
    assert sees("e2", "e1") and not sees("e1", "e2")
    assert sees("i4", "e0") and sees("i4", "e1") and sees("i4", "e2")
    assert not any(sees("i4", k) for k in ["i0", "i1", "i2", "i3"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(
                number_of_user_tokens=4,
                insert_method="[[2, 1], [5, 2]]",
                pretrain_item_num=5,
                recent_item_num=3,
            ),
            "= 3, but number_of_user_tokens is 4",
        ),
        (
            dict(
                number_of_user_tokens=2,
                insert_method="[[5, 1], [2, 1]]",
                pretrain_item_num=None,
                recent_item_num=None,
            ),
            "strictly increasing",
        ),
        (
            dict(number_of_user_tokens=2, insert_method=0, pretrain_item_num=5, recent_item_num=4),
            r"5\) \+ recent_item_num \(4\) = 9, but MAX_ITEM_LIST_LENGTH is 8",
        ),
        (
            dict(
                number_of_user_tokens=2,
                insert_method="[[2, 1], [4, 1]]",
                pretrain_item_num=5,
                recent_item_num=3,
            ),
            "must equal pretrain_item_num",
        ),
        (
            dict(
                number_of_user_tokens=2,
                insert_method="[[8, 2]]",
                pretrain_item_num=None,
                recent_item_num=None,
            ),
            "must lie in",
        ),
    ],
)
def test_inconsistent_options_name_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpertLayout.from_options(window=8, **kwargs)


def test_insert_method_zero_places_all_tokens_after_the_history():
    layout = ExpertLayout.from_options(
        window=8, number_of_user_tokens=3, insert_method="0", pretrain_item_num=5, recent_item_num=3
    )
    assert layout.insertions == ((5, 3),) and layout.length == 11


LAYOUTS = {
    "one segment": ((12, 4),),
    "three segments": ((4, 2), (8, 1), (12, 3)),
}


def _expert_model(name: str, insertions, bias: bool = False) -> ExpertSequenceModel:
    torch.manual_seed(0)
    layout = ExpertLayout(window=18, insertions=insertions)
    extra = {"relative_position_bias": True, "relative_time_bias": True} if bias else {}
    config = BackboneConfig(
        num_items=60,
        max_positions=layout.length,
        embedding_dim=32,
        num_layers=3,
        num_heads=2,
        dropout=0.0,
        **extra,
    )
    model = ExpertSequenceModel(build_backbone(name, config), layout).eval()
    if bias:
        with torch.no_grad():
            for layer in model.backbone.layers:
                layer.relative_bias.position_bias.normal_()
                layer.relative_bias.time_bias.normal_()
    return model


def _batch(batch: int = 4):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (batch, 18), generator=gen)
    ids[0, :7] = 0  # a short user: left padding inside the history
    ids[1, :15] = 0  # history entirely padding, part of the recent window too
    times = torch.cumsum(torch.randint(1, 10_000, (batch, 18), generator=gen), dim=1)
    return ids, times


@pytest.mark.parametrize("name", ["SASRec", "HSTU"])
@pytest.mark.parametrize("segments", list(LAYOUTS))
def test_cached_scores_equal_full_masked_forward(name, segments):
    model = _expert_model(name, LAYOUTS[segments], bias=name == "HSTU")
    ids, times = _batch()
    with torch.no_grad():
        full = model.item_hidden_states(ids, times)[:, 12:]
        cache = model.compress(ids[:, :12], times[:, :12])
        cached = model.predict_hidden(cache, ids[:, 12:], times[:, 12:])
        items = model.backbone.all_item_embeddings()
    assert cache.length == model.layout.num_tokens
    assert (cached[2:] - full[2:]).abs().max() <= 1e-5
    assert (cached @ items.T - full @ items.T)[2:].abs().max() <= 1e-5
    # rows with padded recent items: compare only real positions
    assert (cached[1, 3:] - full[1, 3:]).abs().max() <= 1e-5
    assert (cached[0] - full[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["SASRec", "HSTU"])
def test_refresh_equals_compress_from_scratch(name):
    model = _expert_model(name, LAYOUTS["three segments"], bias=name == "HSTU")
    ids, times = _batch()
    with torch.no_grad():
        scratch = model.compress(ids[:, :12], times[:, :12])
        cache = model.compress(ids[:, :4], times[:, :4], segments=1)
        cache = model.refresh(cache, ids[:, 4:8], times[:, 4:8])
        cache = model.refresh(cache, ids[:, 8:12], times[:, 8:12])
    for a, b in zip(scratch.keys + scratch.values, cache.keys + cache.values, strict=True):
        assert (a - b).abs().max() <= 1e-5
    assert torch.equal(scratch.positions, cache.positions)
    with pytest.raises(ValueError, match="every historical segment"):
        model.refresh(cache, ids[:, 12:16])


@pytest.mark.parametrize("name", ["SASRec", "HSTU"])
def test_history_reaches_recent_items_only_through_experts(name):
    model = _expert_model(name, LAYOUTS["one segment"])
    ids, times = _batch()
    changed = ids.clone()
    changed[2:, 3] = (changed[2:, 3] % 60) + 1
    with torch.no_grad():
        base = model.item_hidden_states(ids, times)
        other = model.item_hidden_states(changed, times)
        # the history changes the recent window's states (through the experts) ...
        assert not torch.allclose(base[2:, 12:], other[2:, 12:])
        # ... and removing the experts' access to it removes the effect
        model._mask[model._expert_slots] = torch.eye(model.layout.length, dtype=torch.bool)[
            model._expert_slots
        ]
        base = model.item_hidden_states(ids, times)
        other = model.item_hidden_states(changed, times)
        torch.testing.assert_close(base[2:, 12:], other[2:, 12:])


def test_training_targets_every_item_and_never_an_expert():
    model = _expert_model("SASRec", LAYOUTS["one segment"])
    recommender = ExpertRecommender(model, ExpertOptions())
    ids, times = _batch()
    targets = torch.roll(ids, -1, dims=1)
    queries, flat_targets = recommender.training_outputs(
        {"input_ids": ids, "target_ids": targets, "timestamps": times}
    )
    assert queries.shape == (4 * 18, 32)
    # the last history item (window position 11) predicts the first recent item, not an expert
    assert torch.equal(flat_targets.view(4, 18)[:, 11], ids[:, 12])
    recent_only = ExpertRecommender(model, ExpertOptions(loss_on_all_items=False))
    _, flat = recent_only.training_outputs({"input_ids": ids, "target_ids": targets, "timestamps": times})
    assert flat.view(4, 18)[:, :12].eq(0).all() and torch.equal(flat.view(4, 18)[:, 12:], targets[:, 12:])


def test_cache_and_full_user_embeddings_agree_through_the_recommender():
    model = _expert_model("HSTU", LAYOUTS["three segments"])
    recommender = ExpertRecommender(model, ExpertOptions())
    ids, times = _batch()
    batch = {"input_ids": ids, "timestamps": times}
    with torch.no_grad():
        cached = recommender.user_embeddings(batch, use_cache=True)
        full = recommender.user_embeddings(batch, use_cache=False)
    assert (cached - full).abs().max() <= 1e-5

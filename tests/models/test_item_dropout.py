"""item_dropout removes recent-window items (not attended, not trained, not targets); history_dropout only hides
history items from attention; with both at 0 training is the plain masked forward."""

import random

import pytest
import torch

from persrec.models import BackboneConfig, build_backbone
from persrec.models.experts import ExpertLayout, ExpertSequenceModel
from persrec.models.recommender import ExpertOptions, ExpertRecommender, remove_items

HISTORY, WINDOW = 10, 18


def _recommender(name: str = "HSTU", **options) -> ExpertRecommender:
    torch.manual_seed(0)
    layout = ExpertLayout(window=WINDOW, insertions=((HISTORY, 3),))
    config = BackboneConfig(
        num_items=60, max_positions=layout.length, embedding_dim=16, num_layers=2, num_heads=2, dropout=0.0
    )
    model = ExpertSequenceModel(build_backbone(name, config), layout)
    return ExpertRecommender(model, ExpertOptions(**options)).train()


def _batch(ids: torch.Tensor, final: torch.Tensor) -> dict[str, torch.Tensor]:
    """Targets as TrainSequences builds them: the next item, `final` after the window, 0 at padding."""
    targets = torch.cat([ids[:, 1:], final[:, None]], dim=1).masked_fill(ids == 0, 0)
    times = torch.arange(1, WINDOW + 1).expand_as(ids) * 10
    return {"input_ids": ids, "target_ids": targets, "timestamps": times}


def _distinct_ids(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of distinct item ids (so an id names one position), the first row left-padded."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.stack([torch.randperm(60, generator=gen)[: WINDOW + 1] + 1 for _ in range(batch)])
    ids, final = rows[:, :WINDOW].clone(), rows[:, WINDOW].clone()
    ids[0, :4] = 0
    return ids, final


def _replace(ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Other real ids at `where` (ids stay in 1..60)."""
    return torch.where(where, (ids + 29) % 60 + 1, ids)


def _outputs(recommender, batch, seed: int = 7):
    torch.manual_seed(seed)
    queries, targets = recommender.training_outputs(batch)
    return queries.view(len(batch["input_ids"]), WINDOW, -1), targets.view(len(batch["input_ids"]), WINDOW)


def test_remove_items_trains_the_pairs_of_the_shortened_sequence():
    ids = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]])
    targets = torch.tensor([[0, 0, 2, 3, 4, 5, 6, 7]])
    removed = torch.tensor([[False, True, False, False, True, True, False, True]])  # slot 1 is padding
    inputs, new_targets = remove_items(ids, targets, removed)
    assert inputs.tolist() == [[0, 0, 1, 2, 0, 0, 5, 0]]
    # 2 -> 5 (3 and 4 cut out), 5 -> 7 (6 cut out, 7 is the item after the window); removed slots train nothing
    assert new_targets.tolist() == [[0, 0, 2, 5, 0, 0, 7, 0]]


def test_remove_items_matches_cutting_the_items_out():
    rng = random.Random(3)
    for _ in range(200):
        width = rng.randint(1, 9)
        pad = rng.randint(0, width)
        sequence = rng.sample(range(1, 100), width - pad + 1)  # the window's items, then the next one
        ids = torch.tensor([[0] * pad + sequence[:-1]])
        targets = torch.tensor([[0] * pad + sequence[1:]])
        removed = torch.tensor([[rng.random() < 0.4 for _ in range(width)]])
        inputs, new_targets = remove_items(ids, targets, removed)
        kept = [
            item for item, gone in zip(ids[0].tolist(), removed[0].tolist(), strict=True) if item and not gone
        ]
        shortened = kept + [sequence[-1]]
        expected_pairs = list(zip(shortened[:-1], shortened[1:], strict=True))
        trained = [(i, t) for i, t in zip(inputs[0].tolist(), new_targets[0].tolist(), strict=True) if t]
        assert trained == expected_pairs
        assert set(inputs[0].tolist()) - {0} == set(kept)


@pytest.mark.parametrize("name", ["SASRec", "HSTU"])
def test_item_dropout_removes_recent_items_only(name):
    recommender = _recommender(name, item_dropout=0.5)
    ids, final = _distinct_ids()
    batch = _batch(ids, final)
    torch.manual_seed(7)
    hidden, removed = recommender.dropout_masks(ids)
    assert not hidden.any() and not removed[:, :HISTORY].any()
    assert removed[:, HISTORY:].any() and not (removed & (ids == 0)).any()
    queries, targets = _outputs(recommender, batch)
    # not attended: another id at a removed slot changes no output at all
    other_ids = _replace(ids, removed)
    other_queries, other_targets = _outputs(recommender, _batch(other_ids, final))
    torch.testing.assert_close(other_queries, queries, rtol=0, atol=0)
    assert torch.equal(other_targets, targets)
    # not targets, and removed slots are no trained queries; the kept items are the shortened sequence's targets
    for row in range(len(ids)):
        gone = set(ids[row][removed[row]].tolist())
        assert gone and not gone & set(targets[row].tolist())
    assert targets[removed].eq(0).all()
    assert torch.equal(targets, remove_items(ids, batch["target_ids"], removed)[1])
    # history items are attended and keep their targets
    assert torch.equal(targets[:, : HISTORY - 1], batch["target_ids"][:, : HISTORY - 1])
    history_changed = _replace(ids, torch.arange(WINDOW) == 6)
    changed_queries, _ = _outputs(recommender, _batch(history_changed, final))
    assert not torch.allclose(changed_queries[:, HISTORY:], queries[:, HISTORY:])


@pytest.mark.parametrize("name", ["SASRec", "HSTU"])
def test_history_dropout_hides_history_items_and_keeps_every_target(name):
    recommender = _recommender(name, history_dropout=0.5)
    ids, final = _distinct_ids()
    batch = _batch(ids, final)
    torch.manual_seed(7)
    hidden, removed = recommender.dropout_masks(ids)
    assert not removed.any() and not hidden[:, HISTORY:].any()
    assert hidden[:, :HISTORY].any() and not (hidden & (ids == 0)).any()
    queries, targets = _outputs(recommender, batch)
    assert torch.equal(targets, batch["target_ids"])
    other_queries, _ = _outputs(recommender, _batch(_replace(ids, hidden), final))
    torch.testing.assert_close(other_queries, queries, rtol=0, atol=0)
    recent_changed = _replace(ids, torch.arange(WINDOW) == HISTORY + 2)
    changed_queries, _ = _outputs(recommender, _batch(recent_changed, final))
    assert not torch.allclose(changed_queries[:, HISTORY + 2 :], queries[:, HISTORY + 2 :])


def test_no_dropout_in_eval_mode_or_at_zero():
    ids, final = _distinct_ids()
    batch = _batch(ids, final)
    for recommender in (
        _recommender(),
        _recommender(item_dropout=0.0, history_dropout=0.0),
        _recommender(item_dropout=0.5, history_dropout=0.5).eval(),
    ):
        state = torch.get_rng_state()
        queries, targets = recommender.training_outputs(batch)
        assert torch.equal(torch.get_rng_state(), state)  # nothing drawn: runs stay reproducible as before
        # With gradients like training_outputs (a pass without may take another kernel build): bit for bit.
        plain = recommender.model.item_hidden_states(ids, batch["timestamps"]).detach()
        torch.testing.assert_close(queries, plain.flatten(0, 1), rtol=0, atol=0)
        assert torch.equal(targets, batch["target_ids"].flatten())

import math

import numpy as np
import pytest
import torch

from persrec.eval.metrics import ranking_metrics
from persrec.eval.ranking import (
    EvalConfig,
    evaluate_popularity,
    evaluate_ranking,
    evaluate_scores,
    format_metrics_table,
    popularity_scores,
    seen_mask,
)

# Five items on the unit circle at 0, 20, 40, ..., 80 degrees (row 0 is padding, pointing away from everyone).
ANGLES = [0.0, 20.0, 40.0, 60.0, 80.0]
ITEMS = torch.tensor(
    [[-1.0, -1.0]] + [[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in ANGLES]
)


def user_at(degrees: float, norm: float = 1.0) -> list[float]:
    return [norm * math.cos(math.radians(degrees)), norm * math.sin(math.radians(degrees))]


def test_seen_mask_ignores_padding():
    mask = seen_mask(torch.tensor([[2, 4, 0], [0, 0, 0]]), 6)
    assert mask.tolist() == [
        [False, False, True, False, True, False],
        [False] * 6,
    ]


def test_hand_computed_ranking():
    # User at 5 degrees: item order 1, 2, 3, 4, 5. User at 75 degrees: order 5, 4, 3, 2, 1.
    users = torch.tensor([user_at(5), user_at(75)])
    targets = torch.tensor([3, 2])  # ranks 2 and 3
    result = evaluate_ranking([(users, targets, None)], ITEMS, EvalConfig(ks=(1, 3)))
    assert result == pytest.approx(ranking_metrics(torch.tensor([2, 3]), ks=(1, 3)))
    assert result["recall@3"] == pytest.approx(0.5)
    assert result["mrr"] == pytest.approx((1 / 3 + 1 / 4) / 2)


def test_filter_seen_on_and_off():
    users = torch.tensor([user_at(5), user_at(75)])
    targets = torch.tensor([3, 2])
    seen = torch.tensor([[1, 2, 3], [5, 0, 0]])  # the first user's target (3) is also in its history
    batches = [(users, targets, seen)]
    kept = evaluate_ranking(batches, ITEMS, EvalConfig(ks=(1, 3)))
    filtered = evaluate_ranking(batches, ITEMS, EvalConfig(ks=(1, 3), filter_seen=True))
    assert kept == pytest.approx(ranking_metrics(torch.tensor([2, 3]), ks=(1, 3)))
    # Items 1, 2 drop out ahead of the first user's target; item 5 ahead of the second's.
    assert filtered == pytest.approx(ranking_metrics(torch.tensor([0, 2]), ks=(1, 3)))


def test_filter_seen_requires_seen_ids():
    batches = [(torch.tensor([user_at(5)]), torch.tensor([1]), None)]
    with pytest.raises(ValueError, match="filter_seen"):
        evaluate_ranking(batches, ITEMS, EvalConfig(filter_seen=True))


def test_dot_product_uses_item_norms():
    items = ITEMS.clone()
    items[5] *= 10.0  # a long vector at 80 degrees
    users = torch.tensor([user_at(5)])
    target = torch.tensor([1])
    cosine = evaluate_ranking([(users, target, None)], items, EvalConfig(ks=(1,)))
    dot = evaluate_ranking([(users, target, None)], items, EvalConfig(ks=(1,)), normalize=False)
    assert cosine["recall@1"] == 1.0
    assert dot["recall@1"] == 0.0 and dot["mrr"] == pytest.approx(0.5)


def test_batches_accumulate_like_one_batch():
    generator = torch.Generator().manual_seed(0)
    items = torch.randn(51, 8, generator=generator)
    users = torch.randn(20, 8, generator=generator)
    targets = torch.randint(1, 51, (20,), generator=generator)
    seen = torch.randint(0, 51, (20, 6), generator=generator)
    config = EvalConfig(filter_seen=True)
    whole = evaluate_ranking([(users, targets, seen)], items, config)
    batched = evaluate_ranking(
        zip(users.split(7), targets.split(7), seen.split(7), strict=True), items, config
    )
    assert batched == pytest.approx(whole)
    assert whole["count"] == 20


def test_low_precision_embeddings_are_scored_in_float32():
    users = torch.tensor([user_at(5)], dtype=torch.bfloat16)
    result = evaluate_ranking([(users, torch.tensor([1]), None)], ITEMS.bfloat16(), EvalConfig(ks=(1,)))
    assert result["recall@1"] == 1.0


def test_popularity_scores():
    scores = popularity_scores(np.array([7, 3, 1, 3]))
    assert scores.dtype == torch.float64
    assert scores[0].item() == -math.inf
    assert scores[1:].tolist() == [3.0, 1.0, 3.0]
    with pytest.raises(ValueError):
        popularity_scores(np.zeros((2, 2)))


def test_popularity_baseline():
    # Item counts (item 0 is padding, its large count must not matter): 1:50, 2:30, 3:30, 4:5, 5:1.
    frequencies = np.array([1000, 50, 30, 30, 5, 1])
    targets = torch.tensor([1, 3, 5])
    seen = torch.tensor([[0, 0], [1, 0], [1, 2]])
    batches = [(targets[:2], seen[:2]), (targets[2:], seen[2:])]

    optimistic = evaluate_popularity(batches, frequencies, EvalConfig(ks=(1, 3)))
    assert optimistic == pytest.approx(ranking_metrics(torch.tensor([0, 1, 4]), ks=(1, 3)))
    pessimistic = evaluate_popularity(batches, frequencies, EvalConfig(ks=(1, 3), ties="pessimistic"))
    assert pessimistic == pytest.approx(ranking_metrics(torch.tensor([0, 2, 4]), ks=(1, 3)))
    filtered = evaluate_popularity(batches, frequencies, EvalConfig(ks=(1, 3), filter_seen=True))
    assert filtered == pytest.approx(ranking_metrics(torch.tensor([0, 0, 2]), ks=(1, 3)))


def test_popularity_goes_through_the_same_path_as_scores():
    frequencies = torch.tensor([0, 4, 9, 2])
    targets = torch.tensor([1, 2, 3])
    rows = popularity_scores(frequencies).expand(3, -1)
    config = EvalConfig(ks=(1, 2))
    assert evaluate_popularity([(targets, None)], frequencies, config) == evaluate_scores(
        [(rows, targets, None)], config
    )


def test_eval_config():
    assert EvalConfig().ks == (5, 10, 50, 200)
    assert EvalConfig(ks=[10, 5]).ks == (10, 5)
    with pytest.raises(ValueError):
        EvalConfig(ties="random")


def test_format_metrics_table():
    results = {
        "valid": ranking_metrics(torch.tensor([0, 3, 12]), ks=(5, 10)),
        "test": ranking_metrics(torch.tensor([1, 30]), ks=(5, 10)),
        "popularity baseline": ranking_metrics(torch.tensor([100, 2]), ks=(5, 10)),
    }
    table = format_metrics_table(results, filter_seen=False)
    lines = table.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["result", "recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr", "users"]
    assert len(lines) == 2 + len(results) + 1
    assert len({len(line) for line in lines[:-1]}) == 1  # aligned
    assert "filter_seen=False" in lines[-1]
    assert "| popularity baseline |" in table
    assert f"{results['valid']['recall@5']:.4f}" in lines[2]
    assert lines[3].split("|")[-2].strip() == "2"
    assert "hr@5" not in table
    assert "filter_seen=True" in format_metrics_table(results, filter_seen=True, ties="pessimistic")
    assert "ties=pessimistic" in format_metrics_table(results, filter_seen=True, ties="pessimistic")


def test_format_handles_missing_and_nan_values():
    table = format_metrics_table(
        {"a": {"recall@5": 0.5, "count": 2.0}, "b": {"recall@5": math.nan, "mrr": 0.25}}, filter_seen=True
    )
    assert "nan" in table
    row_a = next(line for line in table.splitlines() if line.startswith("| a"))
    assert row_a.split("|")[-3].strip() == "-"  # a has no mrr

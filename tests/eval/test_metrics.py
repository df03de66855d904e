import json
import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from persrec.eval.metrics import RankingAccumulator, rank_of_targets, ranking_metrics

RANKS = [0, 3, 12, 60, 250]


def test_hand_computed_metrics():
    m = ranking_metrics(torch.tensor(RANKS))
    assert m["count"] == 5
    assert m["recall@5"] == pytest.approx(2 / 5)
    assert m["recall@10"] == pytest.approx(2 / 5)
    assert m["recall@50"] == pytest.approx(3 / 5)
    assert m["recall@200"] == pytest.approx(4 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 5)
    assert m["ndcg@50"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 5)
    assert m["ndcg@200"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14) + 1 / math.log2(62)) / 5)
    assert m["mrr"] == pytest.approx(sum(1 / (r + 1) for r in RANKS) / 5)
    for k in (5, 10, 50, 200):
        assert m[f"hr@{k}"] == m[f"recall@{k}"]
    assert all(0.0 <= v <= 1.0 for key, v in m.items() if key != "count")


def test_custom_cutoffs_and_key_order():
    m = ranking_metrics(torch.tensor([0, 1, 2]), ks=(1, 3))
    assert list(m) == ["recall@1", "recall@3", "ndcg@1", "ndcg@3", "mrr", "hr@1", "hr@3", "count"]
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(1.0)


@pytest.mark.parametrize("ks", [(), (0, 5), (5, 5)])
def test_invalid_cutoffs(ks):
    with pytest.raises(ValueError):
        RankingAccumulator(ks)


def test_rank_counts_strictly_better_items():
    scores = torch.tensor([[0.0, 0.9, 0.1, 0.5, 0.7], [0.0, 0.2, 0.3, 0.1, 0.0]])
    assert rank_of_targets(scores, torch.tensor([3, 2])).tolist() == [2, 0]


def test_padding_column_is_never_ranked():
    scores = torch.tensor([[100.0, 0.1, 0.5, 0.3]])
    assert rank_of_targets(scores, torch.tensor([2])).tolist() == [0]
    assert rank_of_targets(scores, torch.tensor([1])).tolist() == [2]


def test_excluding_seen_items_improves_the_rank():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.1, 0.5]])
    exclude = torch.tensor([[False, True, False, False, False]])
    assert rank_of_targets(scores, torch.tensor([4])).tolist() == [2]
    assert rank_of_targets(scores, torch.tensor([4]), exclude).tolist() == [1]


def test_target_is_never_excluded():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.1, 0.5]])
    exclude = torch.tensor([[False, True, False, False, True]])  # the target (4) is also marked seen
    for ties in ("optimistic", "pessimistic"):
        assert rank_of_targets(scores, torch.tensor([4]), exclude, ties=ties).tolist() == [1]


def test_tie_policies():
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.9, 0.1]])
    target = torch.tensor([2])
    # Optimistic: only item 4 is strictly better. Pessimistic: items 1 and 3 tie and also count.
    assert rank_of_targets(scores, target).tolist() == [1]
    assert rank_of_targets(scores, target, ties="pessimistic").tolist() == [3]
    with pytest.raises(ValueError):
        rank_of_targets(scores, target, ties="average")


def test_constant_scores_rank_last_when_pessimistic():
    scores = torch.zeros(2, 11)
    assert rank_of_targets(scores, torch.tensor([1, 7])).tolist() == [0, 0]
    assert rank_of_targets(scores, torch.tensor([1, 7]), ties="pessimistic").tolist() == [9, 9]


def test_nan_target_ranks_behind_real_scores():
    scores = torch.tensor([[0.0, 0.2, math.nan, 0.1, math.nan]])
    assert rank_of_targets(scores, torch.tensor([2])).tolist() == [2]


def test_shape_checks():
    with pytest.raises(ValueError):
        rank_of_targets(torch.zeros(2, 5), torch.tensor([1]))
    with pytest.raises(ValueError):
        rank_of_targets(torch.zeros(2, 5), torch.tensor([1, 2]), torch.zeros(2, 4, dtype=torch.bool))


def test_accumulating_batches_equals_one_shot():
    ranks = torch.randint(0, 400, (101,), generator=torch.Generator().manual_seed(0))
    accumulator = RankingAccumulator()
    for chunk in ranks.split(17):
        accumulator.update(chunk)
    streamed, one_shot = accumulator.compute(), ranking_metrics(ranks)
    assert streamed.keys() == one_shot.keys()
    for key in one_shot:
        assert streamed[key] == pytest.approx(one_shot[key], rel=1e-12)


def test_empty_accumulator():
    m = RankingAccumulator((5,)).compute()
    assert m["count"] == 0
    assert math.isnan(m["recall@5"]) and math.isnan(m["mrr"])


def test_all_reduce_without_process_group_is_noop():
    accumulator = RankingAccumulator((5,))
    accumulator.update(torch.tensor([0, 9]))
    accumulator.all_reduce()
    assert accumulator.compute()["recall@5"] == pytest.approx(0.5)


# --- all-reduce over two processes with different numbers of users per rank --------------------------

USERS_PER_RANK = (7, 2)
ALL_RANKS = [0, 3, 12, 60, 250, 1, 7, 400, 2]


def _reduce_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        start = sum(USERS_PER_RANK[:rank])
        local = torch.tensor(ALL_RANKS[start : start + USERS_PER_RANK[rank]])
        accumulator = RankingAccumulator()
        for chunk in local.split(3):
            accumulator.update(chunk)
        local_metrics = accumulator.compute()
        accumulator.all_reduce()
        accumulator.all_reduce()  # a second call must not count twice
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"local": local_metrics, "global": accumulator.compute()}, f)
        with pytest.raises(RuntimeError):
            accumulator.update(local)
    finally:
        dist.destroy_process_group()


def test_all_reduce_is_exact_over_unequal_ranks(tmp_path):
    mp.spawn(_reduce_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = ranking_metrics(torch.tensor(ALL_RANKS))
    for result in results:
        assert result["global"].keys() == expected.keys()
        for key, value in expected.items():
            assert result["global"][key] == pytest.approx(value, rel=1e-12)
    # The average of per-rank averages would be wrong here: the ranks hold 7 and 2 users.
    averaged = (results[0]["local"]["recall@5"] + results[1]["local"]["recall@5"]) / 2
    assert averaged != pytest.approx(expected["recall@5"])

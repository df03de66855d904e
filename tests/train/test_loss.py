import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from persrec.train import loss as loss_module
from persrec.train.loss import MIN_TEMPERATURE, NCEConfig, SampledSoftmaxLoss, _PrivateNegatives

# Item table for hand-computed cases: row i is item i (row 0 is padding).
TABLE = torch.tensor(
    [
        [0.0, 0.0],
        [1.0, 0.0],  # 1
        [0.0, 1.0],  # 2
        [1.0, 1.0],  # 3
        [-1.0, 0.0],  # 4
        [3.0, 4.0],  # 5
        [1.0, 0.01],  # 6: nearly item 1
    ]
)


def make_loss(negatives: list[int] | None = None, num_items: int = 6, **overrides) -> SampledSoftmaxLoss:
    """A loss whose sampled negatives are fixed to `negatives` (for hand-computable cases)."""
    overrides.setdefault("num_negatives", len(negatives) if negatives else 0)
    loss_fn = SampledSoftmaxLoss(NCEConfig(**overrides), num_items=num_items)
    if negatives is not None:
        fixed = torch.tensor(negatives)
        loss_fn.sample_negative_ids = lambda device, generator=None: fixed.to(device)
    return loss_fn


def lookup(ids: torch.Tensor) -> torch.Tensor:
    return TABLE[ids]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.hypot(*a) * math.hypot(*b))


def manual_loss(
    queries: list[list[float]], targets: list[int], negatives: list[list[int]], tau: float
) -> float:
    """Mean over rows of -log softmax(column 0) with cos / tau logits, written out term by term."""
    total = 0.0
    for q, t, negs in zip(queries, targets, negatives, strict=True):
        pos = cosine(q, TABLE[t].tolist()) / tau
        others = [cosine(q, TABLE[j].tolist()) / tau for j in negs]
        total += -(pos - math.log(math.exp(pos) + sum(math.exp(x) for x in others)))
    return total / len(queries)


QUERIES = [[1.0, 0.0], [0.0, 2.0]]


def test_hand_computed_loss():
    tau = 0.5
    loss_fn = make_loss([3, 4, 5], temperature=tau)
    out = loss_fn(torch.tensor(QUERIES), torch.tensor([1, 2]), lookup)
    expected = manual_loss(QUERIES, [1, 2], [[3, 4, 5], [3, 4, 5]], tau)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.num_positions.item() == 2
    assert out.temperature.item() == pytest.approx(tau)
    # Positive logits: cos = 1 for both rows.
    assert out.logits_pos_mean.item() == pytest.approx(1.0 / tau, rel=1e-5)


def test_collision_is_masked():
    tau = 0.2
    queries, targets = torch.tensor(QUERIES), torch.tensor([1, 2])
    with_collision = make_loss([1, 3, 4], temperature=tau)(queries, targets, lookup).loss
    # Row 0's positive (1) is masked for row 0 only; row 1 still sees item 1 as a negative.
    expected = manual_loss(QUERIES, [1, 2], [[3, 4], [1, 3, 4]], tau)
    assert with_collision.item() == pytest.approx(expected, rel=1e-5)
    kept = make_loss([1, 3, 4], temperature=tau, remove_collisions=False)(queries, targets, lookup).loss
    assert kept.item() == pytest.approx(manual_loss(QUERIES, [1, 2], [[1, 3, 4], [1, 3, 4]], tau), rel=1e-5)


def test_all_negatives_masked_gives_zero_finite_loss():
    # With a single item every sampled negative collides with the positive.
    loss_fn = SampledSoftmaxLoss(NCEConfig(num_negatives=8), num_items=1)
    query = torch.randn(3, 2, requires_grad=True)
    out = loss_fn(query, torch.ones(3, dtype=torch.long), lookup)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    out.loss.backward()
    assert torch.isfinite(query.grad).all()


def test_empty_batch_is_finite():
    out = make_loss([3, 4])(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), lookup)
    assert out.loss.item() == 0.0
    assert out.num_positions.item() == 0


def test_padding_targets_are_ignored():
    tau = 0.3
    cfg = {"temperature": tau, "in_batch_negatives": True}
    padded_queries = torch.tensor([QUERIES[0], [math.nan, math.nan], QUERIES[1]], requires_grad=True)
    out = make_loss([3, 4], **cfg)(padded_queries, torch.tensor([1, 0, 2]), lookup)
    # Same as the batch without the padding row; its target (0) is no in-batch negative either.
    expected = manual_loss(QUERIES, [1, 2], [[3, 4, 2], [3, 4, 1]], tau)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.num_positions.item() == 2
    out.loss.backward()
    assert torch.isfinite(padded_queries.grad).all()
    assert padded_queries.grad[1].eq(0).all()
    only_padding = make_loss([3, 4], **cfg)(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), lookup)
    assert only_padding.loss.item() == 0.0 and only_padding.num_positions.item() == 0


def test_learnable_temperature_gets_gradient_and_is_clamped():
    loss_fn = make_loss([3, 4, 5], temperature=0.07, learnable_temperature=True)
    assert loss_fn.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    out = loss_fn(torch.tensor(QUERIES), torch.tensor([1, 2]), lookup)
    out.loss.backward()
    assert loss_fn.log_inv_temperature.grad is not None
    assert loss_fn.log_inv_temperature.grad.abs().item() > 0
    with torch.no_grad():
        loss_fn.log_inv_temperature.fill_(20.0)
    assert loss_fn(torch.tensor(QUERIES), torch.tensor([1, 2]), lookup).temperature.item() == pytest.approx(
        MIN_TEMPERATURE
    )


def test_fixed_temperature_is_not_a_parameter():
    loss_fn = make_loss([3], temperature=0.05)
    assert list(loss_fn.parameters()) == []
    assert "log_inv_temperature" not in loss_fn.state_dict()


def test_in_batch_negatives_exclude_own_target_and_duplicates():
    tau = 0.3
    queries = [[1.0, 0.0], [0.0, 2.0], [1.0, 2.0], [1.0, 1.0]]
    targets = [1, 2, 2, 3]
    loss_fn = make_loss(None, temperature=tau, num_negatives=0, in_batch_negatives=True)
    out = loss_fn(torch.tensor(queries), torch.tensor(targets), lookup)
    # Distinct batch targets {1, 2, 3}, minus each row's own target.
    expected = manual_loss(queries, targets, [[2, 3], [1, 3], [1, 3], [1, 2]], tau)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_in_batch_own_target_masked_even_without_collision_removal():
    tau = 0.3
    loss_fn = make_loss([4], temperature=tau, in_batch_negatives=True, remove_collisions=False)
    out = loss_fn(torch.tensor(QUERIES), torch.tensor([1, 2]), lookup)
    expected = manual_loss(QUERIES, [1, 2], [[4, 2], [4, 1]], tau)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradient_reaches_query_and_item_embeddings():
    torch.manual_seed(0)
    table = nn.Embedding(7, 4)
    query = torch.randn(3, 4, requires_grad=True)
    loss_fn = make_loss([4, 5], num_items=6, in_batch_negatives=True)
    loss_fn(query, torch.tensor([1, 2, 3]), table).loss.backward()
    assert query.grad.abs().sum(dim=1).gt(0).all()
    row_norms = table.weight.grad.abs().sum(dim=1)
    assert row_norms[[1, 2, 3, 4, 5]].gt(0).all()  # positives and negatives
    assert row_norms[[0, 6]].eq(0).all()  # never used


def test_cosine_threshold_masks_near_duplicates():
    tau = 0.5
    queries, targets = torch.tensor(QUERIES), torch.tensor([1, 2])
    out = make_loss([6, 3], temperature=tau, collision_cosine_threshold=0.99)(queries, targets, lookup)
    # Item 6 is nearly item 1 (row 0's positive); it is unrelated to row 1's positive (item 2).
    expected = manual_loss(QUERIES, [1, 2], [[3], [6, 3]], tau)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    plain = make_loss([6, 3], temperature=tau)(queries, targets, lookup).loss
    assert plain.item() == pytest.approx(manual_loss(QUERIES, [1, 2], [[6, 3], [6, 3]], tau), rel=1e-5)


def test_sampled_ids_cover_one_to_num_items_never_zero():
    loss_fn = SampledSoftmaxLoss(NCEConfig(num_negatives=5000), num_items=4)
    ids = loss_fn.sample_negative_ids(torch.device("cpu"), torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int64
    assert ids.min().item() == 1 and ids.max().item() == 4
    assert set(ids.tolist()) == {1, 2, 3, 4}


def test_deterministic_with_generator():
    torch.manual_seed(0)
    table = nn.Embedding(101, 8)
    query, targets = torch.randn(5, 8), torch.randint(1, 101, (5,))
    loss_fn = SampledSoftmaxLoss(NCEConfig(num_negatives=16), num_items=100)

    def run(seed: int) -> torch.Tensor:
        return loss_fn(query, targets, table, generator=torch.Generator().manual_seed(seed)).loss

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_gather_is_a_noop_without_distributed():
    torch.manual_seed(0)
    table = nn.Embedding(51, 8)
    query, targets = torch.randn(6, 8), torch.randint(1, 51, (6,))
    losses = []
    for gather in (False, True):
        cfg = NCEConfig(num_negatives=10, in_batch_negatives=True, gather_across_ranks=gather)
        out = SampledSoftmaxLoss(cfg, 50)(query, targets, table, generator=torch.Generator().manual_seed(1))
        losses.append(out.loss)
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_negatives": -1},
        {"num_negatives": 0},
        {"temperature": 0.0},
        {"temperature": 5.0, "learnable_temperature": True},
        {"collision_cosine_threshold": 1.5},
    ],
)
def test_invalid_config(overrides):
    with pytest.raises(ValueError):
        NCEConfig(**overrides)


# --- all_gather across ranks: gradients must match one process holding every rank's batch ---------------

ROWS_PER_RANK = (5, 3)  # deliberately unequal
SAMPLED_PER_RANK = ([3, 5, 7], [2, 5, 9])
DIST_ITEMS = 9


def _dist_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(DIST_ITEMS + 1, 4, generator=generator)
    queries = torch.randn(sum(ROWS_PER_RANK), 4, generator=generator)
    targets = torch.tensor([1, 2, 3, 2, 5, 3, 8, 0])  # the last position is padding
    return weight, queries, targets


def _dist_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        weight, queries, targets = _dist_data()
        start, n = sum(ROWS_PER_RANK[:rank]), ROWS_PER_RANK[rank]
        table = nn.Embedding.from_pretrained(weight, freeze=False)
        query = queries[start : start + n].clone().requires_grad_(True)
        cfg = NCEConfig(num_negatives=3, in_batch_negatives=True, gather_across_ranks=True, temperature=0.2)
        loss_fn = SampledSoftmaxLoss(cfg, DIST_ITEMS)
        fixed = torch.tensor(SAMPLED_PER_RANK[rank])
        loss_fn.sample_negative_ids = lambda device, generator=None: fixed
        out = loss_fn(query, targets[start : start + n], table)
        # Weight by the rank's share of positions so that the sum over ranks is the global mean.
        share = out.num_positions / (targets > 0).sum()
        weighted = out.loss * share
        weighted.backward()
        weighted = weighted.detach()
        dist.all_reduce(table.weight.grad)  # what DDP does (up to its constant 1 / world size)
        dist.all_reduce(weighted)
        torch.save(
            {"query_grad": query.grad, "weight_grad": table.weight.grad, "loss": weighted},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_gather_across_ranks_matches_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)

    weight, queries, targets = _dist_data()
    table = nn.Embedding.from_pretrained(weight, freeze=False)
    query = queries.clone().requires_grad_(True)
    cfg = NCEConfig(num_negatives=6, in_batch_negatives=True, temperature=0.2)
    reference = SampledSoftmaxLoss(cfg, DIST_ITEMS)
    union = torch.tensor(SAMPLED_PER_RANK[0] + SAMPLED_PER_RANK[1])
    reference.sample_negative_ids = lambda device, generator=None: union
    ref_loss = reference(query, targets, table).loss
    ref_loss.backward()

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, result in enumerate(results):
        start, n = sum(ROWS_PER_RANK[:r]), ROWS_PER_RANK[r]
        torch.testing.assert_close(result["loss"], ref_loss.detach())
        torch.testing.assert_close(result["weight_grad"], table.weight.grad)
        torch.testing.assert_close(result["query_grad"], query.grad[start : start + n])


# 12 positions in 3 sequences, 5 negatives per row: the whole table is scored while 12 * items <= 32 * rows * 5.
@pytest.mark.parametrize(
    ("per_position", "num_items", "from_table"),
    [(False, 30, True), (False, 400, False), (True, 30, True), (True, 400, False)],
    ids=["sequence-table", "sequence-gathered", "position-table", "position-gathered"],
)
def test_private_negatives_match_a_manual_computation(per_position, num_items, from_table, monkeypatch):
    layouts = []
    monkeypatch.setattr(
        loss_module,
        "_PrivateNegatives",
        lambda ids, embeddings, from_table: (
            layouts.append(from_table) or _PrivateNegatives(ids, embeddings, from_table)
        ),
    )
    torch.manual_seed(0)
    rows, length, dim, m = 3, 4, 8, 5
    table = torch.randn(num_items + 1, dim)
    query = torch.randn(rows * length, dim)
    targets = torch.randint(1, num_items + 1, (rows * length,))
    targets[0] = 0  # a padding position
    config = NCEConfig(
        num_negatives=m, temperature=0.1, negatives_per_sequence=True, negatives_per_position=per_position
    )
    loss_fn = SampledSoftmaxLoss(config, num_items)
    out = loss_fn(
        query, targets, lambda ids: table[ids], torch.Generator().manual_seed(7), sequence_length=length
    )
    groups = rows * length if per_position else rows
    negatives = torch.randint(1, num_items + 1, (groups, m), generator=torch.Generator().manual_seed(7))
    group_of = (lambda position: position) if per_position else (lambda position: position // length)
    q = torch.nn.functional.normalize(query, dim=-1)
    e = torch.nn.functional.normalize(table, dim=-1)
    total, count = 0.0, 0
    for position in range(rows * length):
        if targets[position] == 0:
            continue
        negs = [n for n in negatives[group_of(position)].tolist() if n != targets[position]]
        logits = torch.stack([q[position] @ e[targets[position]]] + [q[position] @ e[n] for n in negs]) / 0.1
        total += torch.logsumexp(logits, 0) - logits[0]
        count += 1
    torch.testing.assert_close(out.loss, total / count)
    assert layouts == [from_table]


def test_private_negative_scores_agree_between_table_and_gathered_layouts():
    torch.manual_seed(2)
    table = torch.nn.functional.normalize(torch.randn(9, 3), dim=-1)  # items 1..9
    ids = torch.randint(1, 10, (6, 4))
    vectors = torch.nn.functional.normalize(torch.randn(6, 3), dim=-1)
    from_table = _PrivateNegatives(ids, table, from_table=True).scores(vectors)
    gathered = _PrivateNegatives(ids, table[ids.flatten() - 1], from_table=False).scores(vectors)
    torch.testing.assert_close(from_table, gathered)
    torch.testing.assert_close(gathered[4, 2], vectors[4] @ table[ids[4, 2] - 1])


def test_per_position_negatives_need_no_sequence_length():
    torch.manual_seed(1)
    table = torch.randn(11, 4)
    loss_fn = SampledSoftmaxLoss(NCEConfig(num_negatives=3, negatives_per_position=True), 10)
    out = loss_fn(
        torch.randn(7, 4), torch.arange(1, 8), lambda ids: table[ids], torch.Generator().manual_seed(0)
    )
    assert out.loss.isfinite() and out.loss > 0
    assert out.num_positions == 7


def test_sequence_length_must_divide_the_positions():
    loss_fn = SampledSoftmaxLoss(NCEConfig(num_negatives=3, negatives_per_sequence=True), 10)
    with pytest.raises(ValueError, match="whole sequences"):
        loss_fn(
            torch.randn(7, 4),
            torch.ones(7, dtype=torch.long),
            lambda ids: torch.randn(*ids.shape, 4),
            sequence_length=3,
        )


@pytest.mark.parametrize("num_items", [30, 400], ids=["table", "gathered"])
def test_dropping_padding_positions_changes_neither_loss_nor_gradients(num_items, monkeypatch):
    """On the CPU per-position negatives index padding away; the masked path (accelerators) must agree."""
    torch.manual_seed(3)
    table = torch.randn(num_items + 1, 8)
    query = torch.randn(24, 8)
    targets = torch.randint(1, num_items + 1, (24,))
    targets[:10] = 0  # left padding of the first sequences
    config = NCEConfig(num_negatives=5, temperature=0.1, negatives_per_position=True)
    results = []
    for drop in (True, False):
        monkeypatch.setattr(loss_module, "_index_padding_away", lambda device, drop=drop: drop)
        leaf = query.clone().requires_grad_(True)
        weights = table.clone().requires_grad_(True)
        out = SampledSoftmaxLoss(config, num_items)(
            leaf, targets, lambda ids, w=weights: w[ids], torch.Generator().manual_seed(11)
        )
        out.loss.backward()
        results.append((out.loss.detach(), out.num_positions, leaf.grad, weights.grad))
    (dropped_loss, dropped_n, dropped_q, dropped_w), (masked_loss, masked_n, masked_q, masked_w) = results
    torch.testing.assert_close(dropped_loss, masked_loss)
    assert int(dropped_n) == int(masked_n) == 14
    torch.testing.assert_close(dropped_q, masked_q)
    assert dropped_q[:10].abs().sum() == 0
    torch.testing.assert_close(dropped_w, masked_w)

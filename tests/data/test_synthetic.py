"""The synthetic generator: shape, determinism, bounded chunks, and the long-history property it exists for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from persrec.data.datasets import synthetic
from persrec.data.datasets.synthetic import USERS_FILE, SyntheticConfig, generate_synthetic

SMALL = SyntheticConfig(
    num_users=300, num_items=800, mean_history=80, min_history=20, max_history=400, seed=3
)


@dataclass
class Loaded:
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    cluster: np.ndarray  # cluster of each interaction's item
    long_term: np.ndarray  # (num_users, k) ground truth
    lengths: np.ndarray


def _load(out: Path) -> Loaded:
    inter = pq.read_table(out / "interactions.parquet")
    items = pq.read_table(out / "items.parquet")
    users = pq.read_table(out / USERS_FILE)
    item = inter["item_id"].to_numpy()
    cluster_of = np.zeros(int(items["item_id"].to_numpy().max()) + 1, dtype=np.int64)
    cluster_of[items["item_id"].to_numpy()] = items["cluster"].to_numpy()
    user = inter["user_id"].to_numpy()
    return Loaded(
        user=user,
        item=item,
        timestamp=inter["timestamp"].to_numpy(),
        cluster=cluster_of[item],
        long_term=np.array(users["long_term_clusters"].to_pylist()),
        lengths=np.bincount(user)[1:],
    )


def test_shape_and_schema(tmp_path: Path) -> None:
    built = generate_synthetic(SMALL, tmp_path)
    table = pq.read_table(built.interactions)
    assert table.column_names == ["user_id", "item_id", "timestamp"]
    assert str(table.schema.field("timestamp").type) == "int64"
    data = _load(tmp_path)

    assert np.all(np.diff(data.user) >= 0), "rows must be grouped by user"
    assert data.lengths.size == SMALL.num_users
    assert data.lengths.min() >= SMALL.min_history and data.lengths.max() <= SMALL.max_history
    same_user = np.diff(data.user) == 0
    assert np.all(np.diff(data.timestamp)[same_user] > 0), "times must strictly increase within a user"
    assert data.item.min() >= 1 and data.item.max() <= SMALL.num_items

    items = pq.read_table(built.items).to_pylist()
    assert len(items) == SMALL.num_items
    first = items[0]
    assert first["title"] == f"item {first['item_id']} (cluster {first['cluster']})"
    assert (built.name, built.min_user_interactions, built.min_item_interactions) == ("synthetic", 0, 0)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_deterministic_given_seed(tmp_path: Path) -> None:
    a = generate_synthetic(SMALL, tmp_path / "a")
    b = generate_synthetic(SMALL, tmp_path / "b")
    c = generate_synthetic(SyntheticConfig(**{**SMALL.to_dict(), "seed": 4}), tmp_path / "c")
    assert pq.read_table(a.interactions).equals(pq.read_table(b.interactions))
    assert pq.read_table(a.items).equals(pq.read_table(b.items))
    assert not pq.read_table(a.interactions).equals(pq.read_table(c.interactions))


def test_large_runs_are_written_in_bounded_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic, "_ROWS_PER_CHUNK", 5_000)
    built = generate_synthetic(SMALL, tmp_path)
    meta = pq.ParquetFile(built.interactions).metadata
    assert meta.num_row_groups > 3
    assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 5_000 + SMALL.max_history
    data = _load(tmp_path)
    assert data.lengths.size == SMALL.num_users and np.all(np.diff(data.user) >= 0)


def test_scaled_and_validation() -> None:
    assert SMALL.scaled(2.5).num_users == 750
    assert SMALL.scaled(2.5).num_items == SMALL.num_items
    with pytest.raises(ValueError):
        SyntheticConfig(long_term_share=0.8, noise_share=0.3)
    with pytest.raises(ValueError):
        SyntheticConfig(num_interests=10, long_term_interests_per_user=11)
    with pytest.raises(ValueError):
        SyntheticConfig(min_history=50, max_history=10)


def _top(counts: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-counts, kind="stable")[:k]


def test_long_history_carries_signal_the_recent_window_misses(tmp_path: Path) -> None:
    """The property the generator exists for, measured on the held-out last item of each user.

    1. The last item comes from a long-term cluster far more often than chance.
    2. The user's long-term clusters are recovered from the full history much better than from the last 20
       items (the recent window is dominated by the current short-term cluster).
    3. Predicting the last item's cluster from "long-term clusters of the full history + the current short-term
       cluster" beats a recent-only guess of the same size.
    """
    config = SyntheticConfig(num_users=500, num_items=2000, mean_history=400, min_history=300, seed=11)
    generate_synthetic(config, tmp_path)
    data = _load(tmp_path)
    k, num_clusters, recent = config.long_term_interests_per_user, config.num_interests, 20
    ends = np.cumsum(data.lengths)
    starts = ends - data.lengths

    in_long_term = recovered_full = recovered_recent = hit_both = hit_recent = 0
    for u in range(data.lengths.size):
        history, last = data.cluster[starts[u] : ends[u] - 1], data.cluster[ends[u] - 1]
        truth = set(data.long_term[u].tolist())
        in_long_term += last in truth
        full_top = _top(np.bincount(history, minlength=num_clusters), k)
        recent_counts = np.bincount(history[-recent:], minlength=num_clusters)
        recovered_full += len(truth & set(full_top.tolist())) / k
        recovered_recent += len(truth & set(_top(recent_counts, k).tolist())) / k
        # Current short-term cluster: the most frequent recent cluster outside the long-term estimate.
        short = np.bincount(history[-10:], minlength=num_clusters)
        short[full_top] = -1
        hit_both += last in set(full_top.tolist()) | {int(np.argmax(short))}
        hit_recent += last in set(_top(recent_counts, k + 1).tolist())

    n = data.lengths.size
    chance = k / num_clusters
    assert in_long_term / n > max(0.4, 5 * chance)
    assert recovered_full / n > 0.9
    assert recovered_full / n - recovered_recent / n > 0.15
    assert hit_both / n - hit_recent / n > 0.03

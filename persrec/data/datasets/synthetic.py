"""Synthetic long-history interactions whose next item depends on both stable and drifting interests.

Why it exists: real data sets cannot tell us *whether* a model exploits a long history. Here every user has a
few long-term interest clusters fixed for the whole history and a short-term cluster that drifts every
``short_term_drift`` items on average. Each interaction comes from a long-term cluster with probability
``long_term_share``, otherwise from the current short-term cluster (or, with ``noise_share``, from any cluster).
A model that only sees the last few items sees the short-term cluster well but the long-term clusters only
through a handful of samples; one that sees (a summary of) the full history can recover them.

Generation is vectorised per chunk of users and streamed to parquet, so memory stays bounded for large
``num_users``. Output is deterministic given the config. The ground truth long-term clusters are written to
``users.parquet`` for analysis; ``items.parquet`` carries the cluster both as a column and in the title.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from persrec.atomic import atomic_path
from persrec.data.datasets.movielens import INTERACTIONS_FILE, ITEMS_FILE, BuiltDataset, write_parquet_atomic

USERS_FILE = "users.parquet"
# Bump when the generator's output for a given config changes, so caches keyed on the config are invalidated.
GENERATOR_VERSION = 1
# Rows generated (and written as one parquet row group) per chunk: keeps peak memory near 150 MB whatever num_users is.
_ROWS_PER_CHUNK = 1_000_000

_INTERACTION_SCHEMA = pa.schema([("user_id", pa.int32()), ("item_id", pa.int32()), ("timestamp", pa.int64())])


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic generator; ``num_users`` is the size knob (see :meth:`scaled`)."""

    num_users: int = 2000
    num_items: int = 3000
    mean_history: float = 300.0
    min_history: int = 20
    max_history: int = 3000
    # Spread of the log-normal history length; 1.0 gives a long tail similar to MovieLens.
    history_sigma: float = 1.0
    num_interests: int = 50
    long_term_interests_per_user: int = 3
    # Mean number of items between two changes of the short-term interest.
    short_term_drift: float = 20.0
    long_term_share: float = 0.5
    # Share of interactions drawn from a uniformly random cluster (exploration).
    noise_share: float = 0.05
    # Zipf exponent of item popularity inside a cluster, and of cluster popularity.
    popularity_skew: float = 1.0
    cluster_skew: float = 0.5
    start_timestamp: int = 1_500_000_000
    start_spread_seconds: int = 365 * 24 * 3600
    mean_gap_seconds: float = 6 * 3600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_users < 1 or self.num_items < 1 or self.num_interests < 1:
            raise ValueError("num_users, num_items and num_interests must be positive")
        if self.num_interests > self.num_items:
            raise ValueError("num_interests cannot exceed num_items (every cluster needs an item)")
        if not 0 < self.long_term_interests_per_user <= self.num_interests:
            raise ValueError("long_term_interests_per_user must be in [1, num_interests]")
        if not 1 <= self.min_history <= self.max_history:
            raise ValueError("need 1 <= min_history <= max_history")
        if self.mean_history <= 0 or self.short_term_drift < 1 or self.mean_gap_seconds <= 0:
            raise ValueError("mean_history, mean_gap_seconds must be > 0 and short_term_drift >= 1")
        if min(self.long_term_share, self.noise_share) < 0 or self.long_term_share + self.noise_share > 1:
            raise ValueError("long_term_share and noise_share must be >= 0 and sum to at most 1")

    def scaled(self, factor: float) -> SyntheticConfig:
        """The same distribution with ``factor`` times as many users (items and interests unchanged)."""
        return replace(self, num_users=max(1, round(self.num_users * factor)))

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class _Catalogue:
    """Item side of the generator: cluster of each item and a sampler of items within a cluster."""

    item_cluster: np.ndarray  # (num_items,) cluster of item index i (item_id = i + 1)
    cluster_prob: np.ndarray  # (C,) popularity of clusters
    sorted_items: np.ndarray  # item indices ordered by cluster
    cdf: np.ndarray  # cluster + within-cluster cumulative popularity, increasing over sorted_items

    def sample(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One popularity-weighted item index per entry of ``clusters``, without a Python loop."""
        u = clusters + rng.random(clusters.shape[0]) * (1.0 - 1e-12)
        pos = np.searchsorted(self.cdf, u, side="right")
        return self.sorted_items[np.minimum(pos, self.sorted_items.shape[0] - 1)]


def _zipf(n: int, skew: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** skew
    return weights / weights.sum()


def _catalogue(config: SyntheticConfig) -> _Catalogue:
    rng = np.random.default_rng([config.seed, 0])
    num_items, num_clusters = config.num_items, config.num_interests
    item_cluster = rng.permutation(np.arange(num_items) % num_clusters)
    cluster_prob = _zipf(num_clusters, config.cluster_skew)[rng.permutation(num_clusters)]
    # Within a cluster, popularity follows a Zipf law over a random ranking of its items.
    rank_key = rng.random(num_items)
    sorted_items = np.lexsort((rank_key, item_cluster))
    sorted_cluster = item_cluster[sorted_items]
    counts = np.bincount(sorted_cluster, minlength=num_clusters)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(num_items) - starts[sorted_cluster]
    weight = 1.0 / (rank + 1.0) ** config.popularity_skew
    totals = np.bincount(sorted_cluster, weights=weight, minlength=num_clusters)
    within = (np.cumsum(weight) - np.repeat(np.cumsum(totals) - totals, counts)) / totals[sorted_cluster]
    # Pin each cluster's last entry to exactly 1 so rounding never lets a draw spill into the next cluster.
    within[np.cumsum(counts) - 1] = 1.0
    cdf = sorted_cluster + np.minimum(within, 1.0)
    return _Catalogue(item_cluster, cluster_prob, sorted_items, cdf)


def _history_lengths(config: SyntheticConfig) -> np.ndarray:
    rng = np.random.default_rng([config.seed, 1])
    sigma = config.history_sigma
    mu = np.log(config.mean_history) - sigma**2 / 2
    lengths = np.rint(rng.lognormal(mu, sigma, size=config.num_users))
    return np.clip(lengths, config.min_history, config.max_history).astype(np.int64)


def _long_term_clusters(
    n: int, config: SyntheticConfig, cat: _Catalogue, rng: np.random.Generator
) -> np.ndarray:
    """(n, k) distinct clusters per user, popularity-weighted, via the Gumbel top-k trick."""
    keys = np.log(cat.cluster_prob)[None, :] + rng.gumbel(size=(n, config.num_interests))
    k = config.long_term_interests_per_user
    return np.argsort(-keys, axis=1)[:, :k].astype(np.int32)


def _chunk(
    config: SyntheticConfig, cat: _Catalogue, first_user: int, lengths: np.ndarray, chunk_index: int
) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng([config.seed, 2, chunk_index])
    n, total = lengths.shape[0], int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    user = np.repeat(np.arange(n), lengths)
    long_term = _long_term_clusters(n, config, cat, rng)

    # Short-term interest: piecewise constant, switching with probability 1/drift at each step.
    change = rng.random(total) < 1.0 / config.short_term_drift
    change[starts] = True
    segment = np.cumsum(change) - 1
    segment_cluster = rng.choice(config.num_interests, size=int(segment[-1]) + 1, p=cat.cluster_prob)
    short_term = segment_cluster[segment]

    draw = rng.random(total)
    picked_long = long_term[user, rng.integers(config.long_term_interests_per_user, size=total)]
    random_cluster = rng.integers(config.num_interests, size=total)
    cluster = np.where(draw < config.long_term_share, picked_long, short_term)
    noise = (draw >= config.long_term_share) & (draw < config.long_term_share + config.noise_share)
    cluster[noise] = random_cluster[noise]
    item = cat.sample(cluster, rng)

    # Times: a random start per user, then exponential gaps of at least one second (strictly increasing).
    gaps = 1 + np.floor(rng.exponential(config.mean_gap_seconds, size=total)).astype(np.int64)
    gaps[starts] = 0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[starts], lengths)
    origin = config.start_timestamp + rng.integers(0, max(1, config.start_spread_seconds), size=n)
    timestamp = np.repeat(origin, lengths) + elapsed

    table = pa.table(
        {
            "user_id": (first_user + user + 1).astype(np.int32),
            "item_id": (item + 1).astype(np.int32),
            "timestamp": timestamp.astype(np.int64),
        },
        schema=_INTERACTION_SCHEMA,
    )
    return table, long_term


def _chunk_bounds(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Split users into consecutive blocks of about ``_ROWS_PER_CHUNK`` rows (at least one user each)."""
    ends = np.cumsum(lengths)
    bounds, first = [], 0
    while first < lengths.shape[0]:
        base = ends[first - 1] if first else 0
        last = int(np.searchsorted(ends, base + _ROWS_PER_CHUNK, side="right"))
        last = max(last, first + 1)
        bounds.append((first, last))
        first = last
    return bounds


def _items_table(config: SyntheticConfig, cat: _Catalogue) -> pa.Table:
    ids = np.arange(1, config.num_items + 1)
    titles = [f"item {i} (cluster {c})" for i, c in zip(ids.tolist(), cat.item_cluster.tolist(), strict=True)]
    return pa.table(
        {
            "item_id": pa.array(ids.astype(np.int32)),
            "title": pa.array(titles, type=pa.string()),
            "cluster": pa.array(cat.item_cluster.astype(np.int32)),
        }
    )


def generate_synthetic(config: SyntheticConfig, out_dir: Path) -> BuiltDataset:
    """Generate the data set into ``out_dir`` (interactions, items and ground-truth ``users.parquet``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cat = _catalogue(config)
    lengths = _history_lengths(config)

    path = out_dir / INTERACTIONS_FILE
    long_term_parts = []
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, _INTERACTION_SCHEMA, compression="zstd") as writer:
        for index, (first, last) in enumerate(_chunk_bounds(lengths)):
            table, long_term = _chunk(config, cat, first, lengths[first:last], index)
            writer.write_table(table, row_group_size=table.num_rows)
            long_term_parts.append(long_term)

    long_term = np.concatenate(long_term_parts).astype(np.int32)
    k = config.long_term_interests_per_user
    users = pa.table(
        {
            "user_id": pa.array(np.arange(1, config.num_users + 1, dtype=np.int32)),
            "long_term_clusters": pa.FixedSizeListArray.from_arrays(pa.array(long_term.reshape(-1)), k),
            "history_length": pa.array(lengths.astype(np.int32)),
        }
    )
    write_parquet_atomic(users, out_dir / USERS_FILE)
    return BuiltDataset(
        interactions=path,
        items=write_parquet_atomic(_items_table(config, cat), out_dir / ITEMS_FILE),
        min_user_interactions=0,
        min_item_interactions=0,
        name="synthetic",
        license_note="Synthetic data generated by persrec; no restrictions.",
    )

"""Evaluate a recommender on a split of a prepared dataset, exactly, with any number of processes.

Each process ranks its own shard of users (every world_size-th user) and the metric sums are all-reduced, so
the figures equal a single-process run over all users.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from persrec.data.sequences import MIN_HISTORY, EvalSequences, WindowConfig, collate
from persrec.data.store import PreparedDataset
from persrec.eval.ranking import EmbeddingBatch, EvalConfig, evaluate_popularity, evaluate_ranking
from persrec.models.recommender import ExpertRecommender, SequentialRecommender
from persrec.train.distributed import DistributedContext

Recommender = SequentialRecommender | ExpertRecommender


def eval_loader(
    store: PreparedDataset,
    split: str,
    window: WindowConfig,
    batch_size: int,
    ctx: DistributedContext,
    with_seen: bool,
    num_workers: int = 0,
    stale_gap: tuple[int, int] | None = None,
) -> DataLoader:
    users = np.flatnonzero(store.lengths() >= MIN_HISTORY)[ctx.rank :: ctx.world_size]
    dataset = EvalSequences(store, split, window, users=users, with_seen=with_seen, stale_gap=stale_gap)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)


def _user_batches(
    model: Recommender,
    loader: DataLoader,
    device: torch.device,
    autocast: torch.autocast | None,
    use_cache: bool | None,
) -> Iterator[EmbeddingBatch]:
    for batch in loader:
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "seen"}
        with autocast or contextlib.nullcontext():
            users = model.user_embeddings(inputs, use_cache=use_cache)
        yield users, inputs["target"], batch.get("seen")


@torch.no_grad()
def evaluate_model(
    model: Recommender,
    loader: DataLoader,
    config: EvalConfig,
    device: torch.device,
    autocast: torch.autocast | None = None,
    use_cache: bool | None = None,
) -> dict[str, float]:
    """Metrics of `model` on the loader's users; `use_cache` overrides an expert model's default path."""
    was_training = model.training
    model.eval()
    try:
        batches = _user_batches(model, loader, device, autocast, use_cache)
        return evaluate_ranking(batches, model.item_embeddings(), config)
    finally:
        model.train(was_training)


def training_item_frequencies(store: PreparedDataset) -> np.ndarray:
    """[N + 1] counts of items in the training part of every history (held-out items excluded)."""
    counts = store.item_frequencies().astype(np.int64)
    offsets = np.asarray(store.offsets)
    eligible = np.flatnonzero(np.diff(offsets) >= MIN_HISTORY)
    held_out = np.concatenate(
        [store.items[offsets[eligible + 1] - 1], store.items[offsets[eligible + 1] - 2]]
    )
    counts -= np.bincount(held_out, minlength=len(counts))
    return counts


def evaluate_popularity_baseline(
    store: PreparedDataset, loader: DataLoader, config: EvalConfig, frequencies: np.ndarray
) -> dict[str, float]:
    return evaluate_popularity(((b["target"], b.get("seen")) for b in loader), frequencies, config)

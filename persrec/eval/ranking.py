"""Full-ranking evaluation: every user's target is ranked against the whole catalogue, never a sampled subset.

The evaluator is model-agnostic: it consumes user vectors (or ready-made scores) and item vectors, so any
backbone, the expert-token variants and non-neural baselines go through the same ranking code and their
numbers are directly comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from persrec.eval.metrics import DEFAULT_KS, RankingAccumulator, TiePolicy, rank_of_targets

# (user vectors [B, D], targets [B] int64, seen item ids [B, S] int64 0-padded or None)
EmbeddingBatch = tuple[Tensor, Tensor, Tensor | None]
# (scores [B, N + 1], targets [B] int64, seen item ids [B, S] int64 0-padded or None)
ScoreBatch = tuple[Tensor, Tensor, Tensor | None]


@dataclass
class EvalConfig:
    """What is measured. `filter_seen` changes the numbers a lot, so every printed result states it."""

    ks: tuple[int, ...] = DEFAULT_KS
    # Remove items already in the user's history from the ranking (the target itself always stays).
    filter_seen: bool = False
    # How exact score ties with the target are broken; see `rank_of_targets`.
    ties: TiePolicy = "optimistic"

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        if self.ties not in ("optimistic", "pessimistic"):
            raise ValueError(f"ties must be 'optimistic' or 'pessimistic', got {self.ties!r}")


def seen_mask(seen_ids: Tensor, num_columns: int) -> Tensor:
    """Scatter 0-padded item ids [B, S] into a bool mask [B, num_columns]; column 0 (padding) stays False."""
    seen_ids = seen_ids.long()
    mask = torch.zeros(seen_ids.shape[0], num_columns, dtype=torch.bool, device=seen_ids.device)
    mask.scatter_(1, seen_ids, True)
    mask[:, 0] = False
    return mask


def evaluate_scores(
    batches: Iterable[ScoreBatch], config: EvalConfig, *, device: torch.device | str | None = None
) -> dict[str, float]:
    """Rank each target within its score row and return the metrics, summed over distributed ranks.

    This is the single ranking path every evaluation uses. `device` is where the sums live (the device of
    the first batch when None). With `config.filter_seen`, every batch must carry its seen ids.
    """
    accumulator = RankingAccumulator(config.ks, device=device)
    with torch.no_grad():
        for scores, targets, seen_ids in batches:
            targets = targets.to(scores.device, non_blocking=True)
            exclude = None
            if config.filter_seen:
                if seen_ids is None:
                    raise ValueError("filter_seen=True needs the seen item ids of every batch, got None")
                exclude = seen_mask(seen_ids.to(scores.device, non_blocking=True), scores.shape[1])
            accumulator.update(rank_of_targets(scores, targets, exclude, ties=config.ties))
    accumulator.all_reduce()
    return accumulator.compute()


def _embedding_scores(
    batches: Iterable[EmbeddingBatch], item_embeddings: Tensor, normalize: bool
) -> Iterator[ScoreBatch]:
    """Turn user vectors into score rows against all items: cosine (or dot) in float32. [B, D] -> [B, N + 1]."""
    items = item_embeddings.detach().float()
    if normalize:
        items = F.normalize(items, dim=-1)
    for users, targets, seen_ids in batches:
        users = users.detach().to(items.device, non_blocking=True).float()
        if normalize:
            users = F.normalize(users, dim=-1)
        yield users @ items.T, targets, seen_ids


def evaluate_ranking(
    user_embeddings: Iterable[EmbeddingBatch],
    item_embeddings: Tensor,
    config: EvalConfig,
    *,
    normalize: bool = True,
) -> dict[str, float]:
    """Full-ranking metrics of user vectors against the whole item table.

    user_embeddings: batches of (users [B, D], targets [B], seen ids [B, S] 0-padded or None);
    item_embeddings: [N + 1, D], row 0 is padding and never ranked. Scores are cosine similarities with
    `normalize` (matching the training loss) and raw dot products otherwise; they are computed in float32
    so that low-precision models do not produce artificial ties. The [B, N + 1] score matrix of one batch is
    held in memory, so B bounds the evaluator's memory.
    """
    scores = _embedding_scores(user_embeddings, item_embeddings, normalize)
    return evaluate_scores(scores, config, device=item_embeddings.device)


def popularity_scores(item_frequencies: np.ndarray | Tensor) -> Tensor:
    """Scores of the popularity baseline: [N + 1] frequencies -> [N + 1] float64 with column 0 = -inf.

    float64 keeps counts exact (float32 would merge counts above 2**24 into ties). Frequencies must come from
    training interactions only, or the baseline sees the answers.
    """
    scores = torch.as_tensor(item_frequencies).to(torch.float64).clone()
    if scores.dim() != 1:
        raise ValueError(f"item_frequencies must be 1-D [N + 1], got shape {tuple(scores.shape)}")
    scores[0] = -math.inf
    return scores


def evaluate_popularity(
    batches: Iterable[tuple[Tensor, Tensor | None]],
    item_frequencies: np.ndarray | Tensor,
    config: EvalConfig,
    *,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Popularity baseline through the same ranking path: every user gets the same scores, the item counts.

    batches: (targets [B], seen ids [B, S] 0-padded or None). Many items share a count, so the tie policy
    matters here far more than for a model; `config.ties="pessimistic"` gives the conservative figure.
    """
    scores = popularity_scores(item_frequencies).to(device or "cpu")

    def rows() -> Iterator[ScoreBatch]:
        for targets, seen_ids in batches:
            yield scores.expand(targets.shape[0], -1), targets, seen_ids

    return evaluate_scores(rows(), config, device=scores.device)


def _metric_columns(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    """recall@K for every K, then ndcg@K, then mrr (hr@K duplicates recall@K and is left out)."""
    keys: list[str] = []
    for metrics in results.values():
        keys.extend(k for k in metrics if k not in keys)
    ks = sorted({int(k.split("@", 1)[1]) for k in keys if k.startswith(("recall@", "ndcg@"))})
    columns = [f"recall@{k}" for k in ks if f"recall@{k}" in keys]
    columns += [f"ndcg@{k}" for k in ks if f"ndcg@{k}" in keys]
    if "mrr" in keys:
        columns.append("mrr")
    return columns


def _format_value(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.4f}"


def format_metrics_table(
    results: Mapping[str, Mapping[str, float]], filter_seen: bool, *, ties: str | None = None
) -> str:
    """Aligned markdown table, one row per named result (e.g. "valid", "test", "popularity baseline").

    Values are fractions in [0, 1]; ``users`` is the number of evaluated users. The closing line states
    whether seen items were filtered, since results with and without filtering are not comparable.
    """
    columns = _metric_columns(results)
    header = ["result", *columns, "users"]
    rows = []
    for name, metrics in results.items():
        count = metrics.get("count")
        cells = [_format_value(metrics.get(c)) for c in columns]
        rows.append([str(name), *cells, "-" if count is None else str(int(count))])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def render(cells: Sequence[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    seen_note = "seen items removed from the ranking" if filter_seen else "seen items kept in the ranking"
    statement = f"filter_seen={filter_seen} ({seen_note})"
    if ties is not None:
        statement += f", ties={ties}"
    return "\n".join([render(header), rule, *(render(r) for r in rows), statement])

"""Ranking metrics computed from the 0-based rank of each user's single held-out target item.

Everything is accumulated as device-side float64 *sums* (hits, gains, reciprocal ranks, user count) so that
results from several batches, or several distributed ranks, combine exactly: the final metric is one global
sum divided by one global count, never an average of per-batch or per-rank averages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_KS: tuple[int, ...] = (5, 10, 50, 200)

TiePolicy = Literal["optimistic", "pessimistic"]


def rank_of_targets(
    scores: Tensor,
    targets: Tensor,
    exclude: Tensor | None = None,
    *,
    ties: TiePolicy = "optimistic",
) -> Tensor:
    """0-based rank of each target among all real items: how many candidates are placed ahead of it.

    scores: [B, N + 1] (column 0 is padding and is never a candidate, whatever its score); targets: [B] int64
    item ids in [1, N] (not validated, to avoid a device sync); exclude: [B, N + 1] bool or None, candidates to
    drop from the ranking (e.g. items the user has already seen). Excluding the target itself has no effect:
    it is the item being ranked, not a competitor. Returns [B] int64.

    Tie policy: with ``"optimistic"`` (the default) only candidates scoring *strictly* higher than the target
    count, so the target wins every tie; ``"pessimistic"`` also counts candidates with an equal score, so it
    loses every tie. The two agree unless scores tie exactly, which float32 model scores practically never
    do, but frequency scores (a popularity baseline) and collapsed or low-precision models do. A NaN target
    score ranks behind every candidate with a real score, so a broken model never looks good; NaN candidates
    are never counted.
    """
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(
            f"expected scores [B, N + 1] and targets [B], got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    target_index = targets.long().unsqueeze(1)
    target_score = scores.gather(1, target_index).nan_to_num(nan=-math.inf)
    if ties == "optimistic":
        ahead = scores > target_score
    elif ties == "pessimistic":
        ahead = scores >= target_score
        ahead.scatter_(1, target_index, False)
    else:
        raise ValueError(f"ties must be 'optimistic' or 'pessimistic', got {ties!r}")
    ahead[:, 0] = False
    if exclude is not None:
        if exclude.shape != scores.shape:
            raise ValueError(
                f"exclude must have the shape of scores {tuple(scores.shape)}, got {tuple(exclude.shape)}"
            )
        ahead &= ~exclude
    return ahead.sum(dim=1)


def _validate_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise ValueError("ks must name at least one cutoff")
    if any(k <= 0 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive integers, got {ks}")
    return ks


class RankingAccumulator:
    """Sums of hits@K, NDCG@K and reciprocal rank over users, kept on the device until `compute`.

    Definitions for a target at 0-based rank r: hit@K = 1 if r < K; NDCG@K = 1 / log2(r + 2) if r < K else 0
    (one relevant item, so the ideal DCG is 1); reciprocal rank = 1 / (r + 1) over the *full* ranking, with no
    cutoff (reported as ``mrr``). Recall@K equals HR@K because each user has exactly one target; both keys
    are reported so results compare directly with papers using either name.

    Layout of the single sums tensor [2 * len(ks) + 2] (one tensor, so one all-reduce):
    hits for each K, NDCG for each K, reciprocal rank, user count.
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, device: torch.device | str | None = None) -> None:
        self.ks = _validate_ks(ks)
        self._sums: Tensor | None = None
        self._ks_tensor: Tensor | None = None
        self._device = None if device is None else torch.device(device)
        self._reduced = False

    def _buffer(self, device: torch.device) -> Tensor:
        if self._sums is None:
            self._sums = torch.zeros(2 * len(self.ks) + 2, dtype=torch.float64, device=self._device or device)
            self._ks_tensor = torch.tensor(self.ks, dtype=torch.float64, device=self._sums.device)
        return self._sums

    def update(self, ranks: Tensor) -> None:
        """Add one batch of users. ranks: [B] 0-based integer ranks (as returned by `rank_of_targets`)."""
        if self._reduced:
            raise RuntimeError("update() after all_reduce() would mix global and local sums")
        sums = self._buffer(ranks.device)
        r = ranks.reshape(-1).to(device=sums.device, dtype=torch.float64)
        hit = r.unsqueeze(1) < self._ks_tensor  # [B, len(ks)]
        gain = torch.reciprocal(torch.log2(r + 2.0)).unsqueeze(1)  # [B, 1]
        batch = torch.cat(
            [
                hit.sum(dim=0, dtype=torch.float64),
                (gain * hit).sum(dim=0),
                torch.reciprocal(r + 1.0).sum().unsqueeze(0),
                r.new_full((1,), r.numel()),
            ]
        )
        sums += batch

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum the accumulated sums over all distributed ranks (no-op without an initialised process group).

        Every rank must call this, also ranks that saw no users. It acts once: later calls do nothing, so the
        sums are never counted twice.
        """
        if self._reduced:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            if self._sums is None and self._device is None:
                on_gpu = dist.get_backend(group) == "nccl"
                self._device = (
                    torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
                )
            sums = self._buffer(self._device or torch.device("cpu"))
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            self._reduced = True

    def compute(self) -> dict[str, float]:
        """Metrics as fractions in [0, 1] plus ``count`` (users). Metrics are NaN when no user was seen."""
        n = len(self.ks)
        values = [0.0] * (2 * n + 2) if self._sums is None else self._sums.tolist()
        count = values[-1]

        def mean(total: float) -> float:
            return total / count if count > 0 else math.nan

        result: dict[str, float] = {}
        for i, k in enumerate(self.ks):
            result[f"recall@{k}"] = mean(values[i])
        for i, k in enumerate(self.ks):
            result[f"ndcg@{k}"] = mean(values[n + i])
        result["mrr"] = mean(values[2 * n])
        for k in self.ks:
            result[f"hr@{k}"] = result[f"recall@{k}"]
        result["count"] = count
        return result


def ranking_metrics(ranks: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """One-shot metrics for a single tensor of ranks [B] (see `RankingAccumulator` for the definitions)."""
    accumulator = RankingAccumulator(ks)
    accumulator.update(ranks)
    return accumulator.compute()

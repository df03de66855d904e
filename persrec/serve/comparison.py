"""What the expert cache buys on this machine: per-request latency of the two serving paths and their agreement.

Each request scores every item for one user. The cached path runs only the recent window against the user's
expert cache (compressed once per user beforehand, its cost reported apart); the full path runs the whole
window through the masked forward, as every request would without a cache. Both produce scores from the same
weights, so their largest difference says how exact the cache is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from persrec.data.sequences import EvalSequences, WindowConfig, collate
from persrec.data.store import PreparedDataset
from persrec.models.recommender import ExpertRecommender
from persrec.serve.expert_cache import ExpertServer
from persrec.timing import medians, timed_call


@dataclass(frozen=True)
class ServingComparison:
    requests: int
    window: int
    recent: int
    full_ms: float
    cached_ms: float
    compress_ms: float
    max_abs_score_diff: float

    @property
    def speedup(self) -> float:
        return self.full_ms / self.cached_ms

    def describe(self) -> str:
        return (
            f"serving on this machine, {self.requests} single-user requests, scores for every item:\n"
            f"  full masked pass over {self.window} items: {self.full_ms:.2f} ms per request\n"
            f"  expert cache, {self.recent} recent items:  {self.cached_ms:.2f} ms per request "
            f"({self.speedup:.1f}x faster; compressing a user's history once: {self.compress_ms:.2f} ms)\n"
            f"  largest score difference between the two paths: {self.max_abs_score_diff:.1e}"
        )


def compare_serving(
    recommender: ExpertRecommender,
    store: PreparedDataset,
    window: WindowConfig,
    device: torch.device,
    requests: int = 100,
    split: str = "test",
) -> ServingComparison:
    """Time both paths on the first `requests` users of `split`, one user per request (batch 1)."""
    server = ExpertServer(recommender)
    history = server.history_length
    examples = EvalSequences(store, split, window)  # type: ignore[arg-type]
    full, cached, compress = [], [], []
    worst = 0.0
    for index in range(min(requests, len(examples))):
        batch = {k: v.to(device) for k, v in collate([examples[index]]).items()}
        ids, times, users = batch["input_ids"], batch["timestamps"], batch["user"]
        past, recent = (ids[:, :history], times[:, :history]), (ids[:, history:], times[:, history:])
        full.append(timed_call(partial(server.predict_full, ids, times, users), device))
        compress.append(timed_call(partial(server.compress, *past, users), device))
        cache = server.compress(*past, users)
        cached.append(timed_call(partial(server.predict, cache, *recent), device))
        reference = server.predict_full(ids, times, users)[:, 1:]
        worst = max(worst, (reference - server.predict(cache, *recent)[:, 1:]).abs().max().item())
    to_ms = 1000.0
    return ServingComparison(
        requests=len(full),
        window=ids.shape[1],
        recent=ids.shape[1] - history,
        full_ms=medians(full)[0] * to_ms,
        cached_ms=medians(cached)[0] * to_ms,
        compress_ms=medians(compress)[0] * to_ms,
        max_abs_score_diff=worst,
    )

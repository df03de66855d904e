"""Serving with state: per-user histories and expert caches kept in a store, refreshed as events arrive.

A request for a stored user runs only the recent window against the user's expert cache. The cache is
valid while the cut of `persrec.serve.policy` stays where it was when the cache was built (`covered`);
once new interactions move the cut (every `refresh_every` events once the history is longer than the recent
window), the next request rebuilds it from the P items before the new cut and stores it. A window that
slides moves every item's position in the window, so no part of the old cache is reusable: the rebuild is
a `compress`, never a re-read of the whole history. `staleness` is reported with each answer.

The results equal `Recommender.recommend` on the user's whole history with the same `refresh_every`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from persrec.models.base import KVCache
from persrec.serve.policy import stack_caches
from persrec.serve.recommender_api import EncodedHistory, Recommendation, Recommender
from persrec.serve.store import ExpertCacheStore


class RequestError(ValueError):
    """A request the caller has to fix; `field` names the offending part, `status` the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass
class RecommendRequest:
    user_id: Any = None
    history: Sequence[Any] | None = None  # items after the stored history (or the whole history, no user)
    timestamps: Sequence[int] | None = None
    k: int = 10
    exclude_seen: bool = True


@dataclass
class LiveResult:
    recommendation: Recommendation
    cache: str  # hit | miss | refresh | none (no cache: a plain backbone or a history without a user)
    history_length: int


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    refreshes: int = 0
    staleness: list[int] = field(default_factory=list)


class LiveRecommender:
    def __init__(self, recommender: Recommender, store: ExpertCacheStore) -> None:
        self.recommender = recommender
        self.store = store
        self.counters = CacheCounters()

    # ---- events --------------------------------------------------------------------------------------------
    def check_items(self, name: str, items: Sequence[Any], timestamps: Sequence[int] | None) -> None:
        unknown = [item for item in items if not self.recommender.knows_item(item)]
        if unknown:
            raise RequestError(
                name, f"{len(unknown)} item id(s) the model does not know, e.g. {unknown[:5]}", 422
            )
        if timestamps is not None and len(timestamps) != len(items):
            raise RequestError("timestamps", f"{len(timestamps)} timestamps for {len(items)} items")
        if self.recommender.uses_time and timestamps is None and items:
            raise RequestError("timestamps", "this model uses interaction times; give one per item")

    def add_events(self, user: Any, items: Sequence[Any], timestamps: Sequence[int] | None = None) -> dict:
        if not items:
            raise RequestError("items", "expected at least one item")
        self.check_items("items", items, timestamps)
        length = self.store.append(user, items, timestamps)
        return {"user_id": user, "history_length": length, "staleness": self.recommender.staleness(length)}

    def history(self, user: Any) -> dict:
        stored = self.store.history(user)
        if stored is None:
            raise RequestError("user_id", f"unknown user {user!r}", 404)
        return {"user_id": user, "items": stored.items, "timestamps": stored.timestamps}

    # ---- recommendations -----------------------------------------------------------------------------------
    def _resolve(self, request: RecommendRequest) -> tuple[EncodedHistory, int]:
        """The request's whole history, encoded, and how many of its items are stored."""
        rec = self.recommender
        if (
            not isinstance(request.k, int)
            or isinstance(request.k, bool)
            or not 1 <= request.k <= rec.num_items
        ):
            raise RequestError("k", f"expected an integer in [1, {rec.num_items}], got {request.k!r}")
        extra = list(request.history or [])
        self.check_items("history", extra, request.timestamps)
        stored_items: list[Any] = []
        stored_times: list[int] | None = None
        if request.user_id is not None:
            stored = self.store.history(request.user_id)
            if stored is None and not extra:
                raise RequestError(
                    "user_id", f"unknown user {request.user_id!r} (no events, no history)", 404
                )
            if stored is not None:
                stored_items, stored_times = stored.items, stored.timestamps
        elif not extra:
            raise RequestError("history", "give a user_id, a history, or both")
        times = None
        if rec.uses_time:
            if stored_items and stored_times is None:
                raise RequestError("user_id", "the stored history lacks timestamps this model needs")
            times = list(stored_times or []) + list(request.timestamps or [])
        encoded = rec.encode(stored_items + extra, times)
        return encoded, len(encoded.items) - len(extra)

    def recommend(self, request: RecommendRequest) -> LiveResult:
        return self.recommend_many([request])[0]

    def recommend_many(self, requests: list[RecommendRequest]) -> list[LiveResult | RequestError]:
        """Several requests in one forward pass (micro-batching); a bad request yields its error in place."""
        rec = self.recommender
        results: list[LiveResult | RequestError | None] = [None] * len(requests)
        work: list[tuple[int, EncodedHistory, int]] = []
        for index, request in enumerate(requests):
            try:
                work.append((index, *self._resolve(request)))
            except RequestError as error:
                results[index] = error
        if not work:
            return results  # type: ignore[return-value]
        encoded = [e for _, e, _ in work]
        users = [rec.user_index(requests[i].user_id) for i, _, _ in work]
        status = ["none"] * len(work)
        if rec.is_expert:
            plans = [rec.policy.plan(len(e.items)) for e in encoded]
            caches: list[Any] = [None] * len(work)
            for row, (index, _, _) in enumerate(work):
                user = requests[index].user_id
                if user is None:
                    continue
                found = self.store.get_cache(user, rec.fingerprint)
                if found is not None and found.covered == plans[row].cut:
                    caches[row], status[row] = found.cache, "hit"
                else:
                    status[row] = "miss" if found is None else "refresh"
            missing = [row for row, cache in enumerate(caches) if cache is None]
            if missing:
                built = rec.compress(
                    [plans[r] for r in missing], [encoded[r] for r in missing], [users[r] for r in missing]
                )
                for position, row in enumerate(missing):
                    caches[row] = batch_row(built, position)
                    index, _, stored_length = work[row]
                    if (
                        requests[index].user_id is not None
                        and stored_length > 0
                        and plans[row].cut <= stored_length
                    ):
                        self.store.put_cache(
                            requests[index].user_id, rec.fingerprint, plans[row].cut, caches[row]
                        )
            hidden = rec.hidden_from_cache(stack_caches(caches), plans, encoded)
        else:
            hidden = rec.hidden_states(encoded, users)
        exclude = [e.items for e in encoded]
        ranked = rec.top_k(
            hidden,
            max(requests[i].k for i, _, _ in work),
            [x if requests[i].exclude_seen else x[:0] for (i, _, _), x in zip(work, exclude, strict=True)],
        )
        for row, (index, e, _) in enumerate(work):
            dense, scores = ranked[row]
            k = requests[index].k
            staleness = rec.staleness(len(e.items))
            self._count(status[row], staleness)
            recommendation = rec.result(e, (dense[:k], scores[:k]), staleness)
            results[index] = LiveResult(recommendation, status[row], len(e.items))
        return results  # type: ignore[return-value]

    def _count(self, status: str, staleness: int) -> None:
        counters = self.counters
        counters.hits += status == "hit"
        counters.misses += status == "miss"
        counters.refreshes += status == "refresh"
        if status != "none":
            counters.staleness.append(staleness)
            del counters.staleness[:-1000]


def batch_row(cache: KVCache, index: int) -> KVCache:
    """Batch row `index` of a cache, kept as a batch of one."""
    pick = slice(index, index + 1)
    return KVCache(
        keys=[k[pick] for k in cache.keys],
        values=[v[pick] for v in cache.values],
        positions=cache.positions[pick],
        timestamps=None if cache.timestamps is None else cache.timestamps[pick],
        valid=cache.valid[pick],
    )

"""`persrec.load_recommender`: a trained model that takes and returns original item ids.

    rec = persrec.load_recommender("runs/ml-1m")
    rec.recommend([12, 7, 33], k=10)            # Recommendation(items=[...], scores=[...], ...)
    rec.recommend_batch([[12, 7], [5, 9, 1]])   # one per user, scored in one batch
    rec.user_embedding([12, 7, 33]), rec.item_embeddings()

Scores are the model's cosine scores (the ones training and evaluation rank by). For an expert model the
window is cut where `RefreshPolicy` says, so a server that keeps expert caches between requests returns
exactly what `recommend` returns on the same history and policy (`refresh_every=1`: the evaluator's window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from persrec.config import ConfigError
from persrec.models.base import KVCache
from persrec.models.recommender import ExpertRecommender
from persrec.serve.model_dir import ModelFiles, serving_model
from persrec.serve.policy import RefreshPolicy, WindowPlan

UNKNOWN_EXAMPLES = 5


@dataclass
class Recommendation:
    items: list[Any]  # original item ids, best first
    scores: list[float]
    # History ids the model does not know: skipped (never mapped to another item), counted and shown.
    unknown_count: int = 0
    unknown_examples: list[Any] = field(default_factory=list)
    # Interactions after the cut the expert cache covers (0 for a plain backbone).
    staleness: int = 0


@dataclass
class EncodedHistory:
    """A history in the model's dense item indices (unknown ids removed, with their timestamps)."""

    items: np.ndarray  # int64 [n]
    timestamps: np.ndarray | None  # int64 [n]
    unknown_count: int = 0
    unknown_examples: list[Any] = field(default_factory=list)


class Recommender:
    """A trained recommender bound to its item id map; see the module docstring."""

    def __init__(
        self,
        files: ModelFiles,
        model: torch.nn.Module,
        device: torch.device,
        refresh_every: int = 1,
    ) -> None:
        self.files = files
        self.model = model.eval()
        self.device = device
        self.item_ids = files.item_ids
        self._dense = {item: index + 1 for index, item in enumerate(files.item_ids)}
        self._users = {str(user): index for index, user in enumerate(files.user_ids or [])}
        # JSON and the command line give ids as text or numbers; the map decides which an id is.
        self._numeric_ids = bool(files.item_ids) and isinstance(files.item_ids[0], int)
        self.is_expert = isinstance(model, ExpertRecommender)
        self.window = files.config.MAX_ITEM_LIST_LENGTH
        self.uses_time = bool(files.config.relative_time_bias)
        self.policy: RefreshPolicy | None = None
        if self.is_expert:
            layout = model.model.layout
            recent = layout.window - layout.history_length
            try:
                self.policy = RefreshPolicy(layout.history_length, recent, refresh_every)
            except ValueError as error:
                raise ConfigError(str(error)) from error
        with torch.no_grad():
            self._items = F.normalize(model.item_embeddings().detach().float(), dim=-1).to(device)

    # ---- identity ------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.files.fingerprint

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def normalize_id(self, item: Any) -> Any:
        """An item id in the map's type: "12" -> 12 for a map of integer ids, 12 -> "12" for text ids."""
        if self._numeric_ids:
            if isinstance(item, str) and item.strip().lstrip("-").isdigit():
                return int(item)
            return item
        return item if isinstance(item, str) else str(item)

    def knows_item(self, item: Any) -> bool:
        return self.normalize_id(item) in self._dense

    def user_index(self, user: Any) -> int:
        """The training user index for per-user expert tokens; -1 (the shared tokens) when unknown."""
        return -1 if user is None else self._users.get(str(user), -1)

    # ---- ids -----------------------------------------------------------------------------------------------
    def encode(self, history: Sequence[Any], timestamps: Sequence[int] | None = None) -> EncodedHistory:
        if timestamps is not None and len(timestamps) != len(history):
            raise ValueError(f"timestamps has {len(timestamps)} values for {len(history)} history items")
        if self.uses_time and timestamps is None:
            raise ValueError("this model uses interaction times (relative_time_bias); pass timestamps")
        # Ids already in the map's type (the usual case: the store returns what was put) need one lookup
        # each; only the misses are normalised (a 1,400-item history: 0.1 instead of 1.1 ms per request).
        get = self._dense.get
        dense = [get(item) for item in history]
        if None in dense:
            normalize = self.normalize_id
            dense = [
                index if index is not None else get(normalize(item), 0)
                for index, item in zip(dense, history, strict=True)
            ]
        unknown = (
            [item for item, index in zip(history, dense, strict=True) if index == 0] if 0 in dense else []
        )
        items = np.asarray(dense, dtype=np.int64)
        keep = items > 0
        times = None if timestamps is None else np.asarray(timestamps, dtype=np.int64)[keep]
        return EncodedHistory(items[keep], times, len(unknown), unknown[:UNKNOWN_EXAMPLES])

    def decode(self, dense: Sequence[int]) -> list[Any]:
        return [self.item_ids[index - 1] for index in dense]

    # ---- user states ---------------------------------------------------------------------------------------
    def _tensor(self, rows: list[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.stack(rows)).to(self.device)

    def compress(self, plans: list[WindowPlan], histories: list[EncodedHistory], users: list[int]) -> KVCache:
        """The expert cache [B] of each user's history part under its plan."""
        ids = self._tensor([plan.history_part(h.items) for plan, h in zip(plans, histories, strict=True)])
        times = None
        if self.uses_time:
            times = self._tensor(
                [plan.history_part(h.timestamps) for plan, h in zip(plans, histories, strict=True)]
            )
        user_tensor = torch.tensor(users, device=self.device) if self._per_user() else None
        with torch.inference_mode():
            return self.model.compress(ids, times, user_tensor)

    def hidden_from_cache(
        self, cache: KVCache, plans: list[WindowPlan], histories: list[EncodedHistory]
    ) -> Tensor:
        """[B, D] query states: the recent window run against the cache, read at each user's last item."""
        recent = self._tensor([plan.recent_part(h.items) for plan, h in zip(plans, histories, strict=True)])
        times = None
        if self.uses_time:
            times = self._tensor(
                [plan.recent_part(h.timestamps) for plan, h in zip(plans, histories, strict=True)]
            )
        # Slots before every row's first item are padding for the whole batch: a batch of users shorter than
        # the recent window runs only its last `width` slots (what a padded window computes, see predict_hidden).
        skip = min(plan.offset for plan in plans)
        recent = recent[:, skip:]
        times = None if times is None else times[:, skip:]
        slots = [plan.query_slot - skip for plan in plans]
        rows = recent.shape[1] - min(slots)  # only the slots from the earliest query on are read
        query = torch.tensor([slot - (recent.shape[1] - rows) for slot in slots], device=self.device)
        with torch.inference_mode():
            hidden = self.model.model.predict_hidden(cache, recent, times, output_rows=rows)
        return hidden[torch.arange(len(plans), device=self.device), query]

    def _per_user(self) -> bool:
        return self.is_expert and self.model.model.experts.per_user is not None

    def hidden_states(self, histories: list[EncodedHistory], users: list[int] | None = None) -> Tensor:
        """[B, D] query states of whole histories (no stored cache)."""
        users = users or [-1] * len(histories)
        if self.is_expert:
            plans = [self.policy.plan(len(h.items)) for h in histories]
            return self.hidden_from_cache(self.compress(plans, histories, users), plans, histories)
        ids = self._tensor([_left_pad(h.items[-self.window :], self.window) for h in histories])
        batch = {"input_ids": ids}
        if self.uses_time:
            batch["timestamps"] = self._tensor(
                [_left_pad(h.timestamps[-self.window :], self.window) for h in histories]
            )
        with torch.inference_mode():
            return self.model.user_embeddings(batch)

    # ---- scoring -------------------------------------------------------------------------------------------
    def top_k(
        self, hidden: Tensor, k: int, exclude: list[np.ndarray] | None = None
    ) -> list[tuple[list[int], list[float]]]:
        """Top-k dense ids and cosine scores per row of `hidden` [B, D]; `exclude` ids per row left out."""
        with torch.inference_mode():
            scores = F.normalize(hidden.float(), dim=-1) @ self._items.T
            scores[:, 0] = float("-inf")
            if exclude is not None:
                for row, seen in enumerate(exclude):
                    if len(seen):
                        scores[row, torch.from_numpy(seen).to(self.device)] = float("-inf")
            values, indices = scores.topk(min(k, self.num_items), dim=1)
        out = []
        for vals, idx in zip(values.cpu().tolist(), indices.cpu().tolist(), strict=True):
            kept = [(i, v) for i, v in zip(idx, vals, strict=True) if v != float("-inf")]
            out.append(([i for i, _ in kept], [v for _, v in kept]))
        return out

    def check_k(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.num_items:
            raise ValueError(f"k must be an integer in [1, {self.num_items}] (the catalogue size), got {k!r}")

    def result(
        self, encoded: EncodedHistory, ranked: tuple[list[int], list[float]], staleness: int = 0
    ) -> Recommendation:
        dense, scores = ranked
        return Recommendation(
            self.decode(dense), scores, encoded.unknown_count, encoded.unknown_examples, staleness
        )

    def staleness(self, length: int) -> int:
        return 0 if self.policy is None else self.policy.plan(length).staleness

    # ---- public API ----------------------------------------------------------------------------------------
    def recommend(
        self,
        history: Sequence[Any],
        k: int = 10,
        timestamps: Sequence[int] | None = None,
        exclude_seen: bool = True,
        user: Any = None,
    ) -> Recommendation:
        """Top-k original item ids (with scores) for the next interaction after `history` (oldest first).

        `user`: the original user id, for a model with per-user expert tokens (others ignore it).
        """
        return self.recommend_batch(
            [history], k, None if timestamps is None else [timestamps], exclude_seen, [user]
        )[0]

    def recommend_batch(
        self,
        histories: Sequence[Sequence[Any]],
        k: int = 10,
        timestamps: Sequence[Sequence[int]] | None = None,
        exclude_seen: bool = True,
        users: Sequence[Any] | None = None,
    ) -> list[Recommendation]:
        """`recommend` for many users at once (one forward pass for the batch)."""
        self.check_k(k)
        if not histories:
            return []
        encoded = [
            self.encode(h, None if timestamps is None else timestamps[i]) for i, h in enumerate(histories)
        ]
        results: list[Recommendation | None] = [None] * len(encoded)
        scored = [i for i, e in enumerate(encoded) if len(e.items)]
        for i, e in enumerate(encoded):
            if not len(e.items):  # nothing known to condition on: no recommendation rather than a guess
                results[i] = Recommendation([], [], e.unknown_count, e.unknown_examples)
        if scored:
            user_index = [self.user_index(None if users is None else users[i]) for i in scored]
            hidden = self.hidden_states([encoded[i] for i in scored], user_index)
            exclude = [np.unique(encoded[i].items) for i in scored] if exclude_seen else None
            for i, ranked in zip(scored, self.top_k(hidden, k, exclude), strict=True):
                results[i] = self.result(encoded[i], ranked, self.staleness(len(encoded[i].items)))
        return results  # type: ignore[return-value]

    def user_embedding(
        self, history: Sequence[Any], timestamps: Sequence[int] | None = None, user: Any = None
    ) -> np.ndarray:
        """The L2-normalised query vector [D] of `history`: its dot product with `item_embeddings()` rows is the
        score `recommend` ranks by."""
        encoded = self.encode(history, timestamps)
        if not len(encoded.items):
            raise ValueError("the history holds no item the model knows")
        hidden = self.hidden_states([encoded], [self.user_index(user)])
        return F.normalize(hidden.float(), dim=-1)[0].cpu().numpy()

    def user_embeddings(self, histories: list[EncodedHistory], users: list[int] | None = None) -> np.ndarray:
        """[B, D] normalised query vectors of already-encoded, non-empty histories."""
        return F.normalize(self.hidden_states(histories, users).float(), dim=-1).cpu().numpy()

    def item_embeddings(self) -> tuple[list[Any], np.ndarray]:
        """(original item ids [N], L2-normalised item vectors [N, D] float32), in the same order."""
        return list(self.item_ids), self._items[1:].cpu().numpy().astype(np.float32)


def _left_pad(values: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.int64)
    if len(values):
        out[-len(values) :] = values
    return out


def load_recommender(
    path: str | Path, *, device: str = "cpu", refresh_every: int = 1, threads: int | None = None
) -> Recommender:
    """Load a run directory (its best weights) or a `best/` directory for serving; see the module docstring.

    `refresh_every` (expert models): how many interactions the window may run past the cached history
    before the expert cache is rebuilt (1 = rebuilt at every interaction, the evaluator's window).
    """
    if not isinstance(refresh_every, int) or refresh_every < 1:
        raise ConfigError(f"refresh_every must be a positive integer, got {refresh_every!r}")
    if threads:
        torch.set_num_threads(threads)
    files = ModelFiles.open(Path(path))
    model = serving_model(files)
    model.to(torch.device(device))
    return Recommender(files, model, torch.device(device), refresh_every)

"""Serving with the expert cache: per-user compress once, then cheap requests over the recent window.

`ExpertServer` wraps a trained expert model for inference: item ids in, scores or top-K item ids out. The
cache is a plain `KVCache` (per-layer keys/values of the k expert tokens), so callers can keep it wherever
they keep per-user state and move it between devices with `.to()` on its tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from persrec.models.base import KVCache
from persrec.models.recommender import ExpertRecommender


class ExpertServer:
    def __init__(self, recommender: ExpertRecommender) -> None:
        self.recommender = recommender.eval()
        self.model = recommender.model
        self._items: Tensor | None = None

    @property
    def history_length(self) -> int:
        """P: items the history part of the window holds (what `compress` expects)."""
        return self.model.layout.history_length

    @property
    def recent_length(self) -> int:
        """R: items of the recent window (the most `predict` takes)."""
        return self.model.layout.window - self.model.layout.history_length

    def _item_matrix(self) -> Tensor:
        if self._items is None:  # normalised once: the catalogue does not change between requests
            self._items = F.normalize(self.recommender.item_embeddings().detach().float(), dim=-1)
        return self._items

    @torch.inference_mode()
    def compress(
        self,
        history_ids: Tensor,
        timestamps: Tensor | None = None,
        users: Tensor | None = None,
        segments: int | None = None,
    ) -> KVCache:
        """history_ids: [B, P'] left-padded item ids of the first `segments` history segments (default: all,
        P' = P) -> the users' expert cache.

        users: [B] user indices of the training data, for a model with per-user expert tokens (unknown or
        missing users get the shared tokens). The recommender's options apply as in evaluation: without
        `predict_with_full_item_seq` the history is not read and the cache holds the experts alone.
        """
        return self.recommender.compress(history_ids, timestamps, users, segments)

    @torch.inference_mode()
    def refresh(
        self,
        cache: KVCache,
        segment_ids: Tensor,
        timestamps: Tensor | None = None,
        users: Tensor | None = None,
    ) -> KVCache:
        """Fold the next completed history segment [B, n] into the cache (multi-segment layouts); `users` as
        for `compress` (the segment's expert group gets the same per-user tokens)."""
        return self.recommender.refresh(cache, segment_ids, timestamps, users)

    def _scores(self, hidden: Tensor) -> Tensor:
        scores = F.normalize(hidden.float(), dim=-1) @ self._item_matrix().T
        scores[:, 0] = float("-inf")
        return scores

    @torch.inference_mode()
    def predict_full(
        self, window_ids: Tensor, timestamps: Tensor | None = None, users: Tensor | None = None
    ) -> Tensor:
        """Scores like `predict`, but from the whole window [B, P + R] in one full masked pass (no cache):
        what every request would cost without the expert cache."""
        batch = {"input_ids": window_ids, "timestamps": timestamps, "user": users}
        batch = {key: value for key, value in batch.items() if value is not None}
        return self._scores(self.recommender.user_embeddings(batch, use_cache=False))

    @torch.inference_mode()
    def predict(self, cache: KVCache, recent_ids: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """Cosine scores [B, N + 1] of every item for the next interaction; column 0 (padding) is -inf.

        recent_ids: [B, R'] with R' <= R, left-padded; they take the last R' slots of the recent window.
        """
        if recent_ids.shape[1] < self.recent_length:
            pad = self.recent_length - recent_ids.shape[1]
            recent_ids = F.pad(recent_ids, (pad, 0))
            timestamps = None if timestamps is None else F.pad(timestamps, (pad, 0))
        return self._scores(self.model.predict_hidden(cache, recent_ids, timestamps)[:, -1])

    @torch.inference_mode()
    def top_k(
        self,
        cache: KVCache,
        recent_ids: Tensor,
        k: int,
        exclude: Tensor | None = None,
        timestamps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(scores [B, k], item ids [B, k]); `exclude` [B, S] 0-padded ids to leave out (e.g. seen items)."""
        scores = self.predict(cache, recent_ids, timestamps)
        if exclude is not None:
            scores.scatter_(1, exclude.long(), float("-inf"))
        return scores.topk(k, dim=1)

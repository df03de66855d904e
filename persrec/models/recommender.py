"""A backbone plus the recipe that turns batches into training pairs and user vectors.

This is the model contract the trainer, the evaluator and serving rely on (three methods, as in RecBole):
`training_outputs` for the loss, `user_embeddings` for ranking, `item_embeddings` for the candidates. Models
with expert tokens (`persrec.models.experts`) implement the same contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from persrec.models.base import KVCache, SequenceBackbone
from persrec.models.experts import ExpertSequenceModel


class SequentialRecommender(nn.Module):
    def __init__(self, backbone: SequenceBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def training_outputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Queries [B·L, D] and their target ids [B·L]; target 0 marks a position without a loss."""
        hidden = self.backbone(batch["input_ids"], batch.get("timestamps"))
        return hidden.flatten(0, 1), batch["target_ids"].flatten()

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Training outputs; `forward` so that DistributedDataParallel hooks the gradient sync onto it."""
        return self.training_outputs(batch)

    def user_embeddings(self, batch: dict[str, Tensor], use_cache: bool | None = None) -> Tensor:
        """[B, D]: the hidden state of the most recent item (windows are left-padded). `use_cache` is
        accepted for interface parity with expert models; a plain backbone has no cache."""
        return self.backbone(batch["input_ids"], batch.get("timestamps"), output_rows=1)[:, -1]

    def embed_items(self, item_ids: Tensor) -> Tensor:
        return self.backbone.embed_items(item_ids)

    def item_embeddings(self) -> Tensor:
        """[N + 1, D] candidate vectors; row 0 is padding."""
        return self.backbone.all_item_embeddings()


@dataclass
class ExpertOptions:
    """How an expert model trains and predicts (the original scripts' flags, clearly named)."""

    # Train on every item target of every segment (True) or only on the recent window's targets.
    loss_on_all_items: bool = True
    # Training: probability of removing each recent-window item from the sequence (see `remove_items`).
    item_dropout: float = 0.0
    # Training: probability of hiding each history item from attention; every target is kept.
    history_dropout: float = 0.0
    # Predict from history + experts + recent items (True) or from the recent items alone.
    predict_with_full_item_seq: bool = True
    # Score users through the expert cache (compress + predict) instead of the full masked pass.
    use_cache: bool = True


def remove_items(item_ids: Tensor, target_ids: Tensor, removed: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs and targets as if the `removed` items had been cut out of the sequence, without moving anything.

    item_ids / target_ids / removed: [B, W] (target_ids[:, t] is what position t predicts, i.e. the item at t + 1
    or, for the last position, the next item after the window). A removed position becomes padding, so no
    query attends to it, and its own target becomes 0, so it is not a trained query. A position whose next item
    was removed predicts the next item that was kept instead (the target of the last removed position of the run):
    exactly the pairs the shortened sequence would train on, so a removed item is never a target and every kept
    item still is. Only slots holding an item (id > 0) are removed; padding keeps target 0. -> ([B, W], [B, W])
    """
    removed = removed & (item_ids > 0)
    width = item_ids.shape[1]
    slots = torch.arange(width, device=item_ids.device).expand_as(item_ids)
    kept_slot = torch.where(removed, width, slots)
    # first kept slot after t (width if none): a suffix minimum, shifted by one
    next_kept = kept_slot.flip(1).cummin(1).values.flip(1)
    next_kept = torch.cat([next_kept[:, 1:], next_kept.new_full((len(item_ids), 1), width)], dim=1)
    targets = target_ids.gather(1, next_kept - 1)
    targets = torch.where(removed | (target_ids == 0), 0, targets)
    return item_ids.masked_fill(removed, 0), targets


class ExpertRecommender(nn.Module):
    """The recommender contract for a backbone with expert tokens (PersonalizedSASRec / PersonalizedHSTU)."""

    def __init__(self, model: ExpertSequenceModel, options: ExpertOptions) -> None:
        super().__init__()
        self.model = model
        self.options = options

    @property
    def backbone(self) -> SequenceBackbone:
        return self.model.backbone

    def _history_length(self) -> int:
        return self.model.layout.history_length

    # ---- training ------------------------------------------------------------------------------------------
    def dropout_masks(self, item_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(hidden history items, removed recent items), each [B, W] bool, drawn from the global RNG.

        The history draw comes first and a probability of 0 draws nothing, so a model without dropout
        consumes no random numbers (runs stay bit-for-bit as before the options existed).
        """
        history = self._history_length()
        real = item_ids > 0
        hidden = torch.zeros_like(real)
        removed = torch.zeros_like(real)
        if self.options.history_dropout > 0:
            draw = torch.rand(item_ids.shape, device=item_ids.device) < self.options.history_dropout
            hidden[:, :history] = draw[:, :history] & real[:, :history]
        if self.options.item_dropout > 0:
            draw = torch.rand(item_ids.shape, device=item_ids.device) < self.options.item_dropout
            removed[:, history:] = draw[:, history:] & real[:, history:]
        return hidden, removed

    def training_outputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Queries [B·W, D] and target ids [B·W] (0 = no loss) under the masked forward.

        In training mode, `item_dropout` removes recent-window items (`remove_items`: not attended, not a
        trained query, not a target): predicting the recent items with some of them missing, the authors'
        option. Their code masks the loss by input, so there a dropped item stays the previous position's
        target and the item after it is nobody's; cutting the item out is what dropping it means.
        `history_dropout` turns history items into padding for attention only: the experts summarise an
        incomplete history while every target, including the hidden items, is kept. Both act through padding
        (id 0), which the mask already excludes from attention.
        """
        item_ids, targets = batch["input_ids"], batch["target_ids"]
        history = self._history_length()
        if self.training and (self.options.item_dropout > 0 or self.options.history_dropout > 0):
            hidden, removed = self.dropout_masks(item_ids)
            item_ids = item_ids.masked_fill(hidden, 0)
            item_ids, targets = remove_items(item_ids, targets, removed)
        hidden_states = self.model.item_hidden_states(item_ids, batch.get("timestamps"), batch.get("user"))
        if not self.options.loss_on_all_items:
            targets = targets.clone()
            targets[:, :history] = 0
        return hidden_states.flatten(0, 1), targets.flatten()

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.training_outputs(batch)

    # ---- prediction ----------------------------------------------------------------------------------------
    def _history_inputs(self, history_ids: Tensor) -> Tensor:
        """History items as prediction reads them: all padding unless `predict_with_full_item_seq`."""
        return history_ids if self.options.predict_with_full_item_seq else torch.zeros_like(history_ids)

    def compress(
        self,
        history_ids: Tensor,
        timestamps: Tensor | None = None,
        users: Tensor | None = None,
        segments: int | None = None,
    ) -> KVCache:
        """The expert cache prediction uses: [B, P'] history (left-padded) -> cache; `users` [B] select the
        per-user expert tokens when the model has them. The one place the options shape the cache, so the
        evaluator and `persrec.serve.ExpertServer` score identically."""
        return self.model.compress(self._history_inputs(history_ids), timestamps, users, segments)

    def refresh(
        self,
        cache: KVCache,
        segment_ids: Tensor,
        timestamps: Tensor | None = None,
        users: Tensor | None = None,
    ) -> KVCache:
        """Fold the next completed history segment [B, n] into `cache`, under the same options as `compress`."""
        return self.model.refresh(cache, self._history_inputs(segment_ids), timestamps, users)

    def user_embeddings(self, batch: dict[str, Tensor], use_cache: bool | None = None) -> Tensor:
        """[B, D]: the hidden state of the window's last item, through the cache or the full masked pass."""
        item_ids, times, users = batch["input_ids"], batch.get("timestamps"), batch.get("user")
        history = self._history_length()
        use_cache = self.options.use_cache if use_cache is None else use_cache
        if not use_cache:
            item_ids = torch.cat([self._history_inputs(item_ids[:, :history]), item_ids[:, history:]], dim=1)
            return self.model.item_hidden_states(item_ids, times, users)[:, -1]
        cache = self.compress(item_ids[:, :history], None if times is None else times[:, :history], users)
        recent_times = None if times is None else times[:, history:]
        return self.model.predict_hidden(cache, item_ids[:, history:], recent_times, output_rows=1)[:, -1]

    def embed_items(self, item_ids: Tensor) -> Tensor:
        return self.backbone.embed_items(item_ids)

    def item_embeddings(self) -> Tensor:
        return self.backbone.all_item_embeddings()

"""A backbone plus the recipe that turns batches into training pairs and user vectors.

This is the model contract the trainer, the evaluator and serving rely on (three methods, as in RecBole):
`training_outputs` for the loss, `user_embeddings` for ranking, `item_embeddings` for the candidates. Models
with expert tokens (`persrec.models.experts`) implement the same contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from persrec.models.base import SequenceBackbone
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
        return self.backbone(batch["input_ids"], batch.get("timestamps"))[:, -1]

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
    # Probability of hiding each historical item during training (regularises the experts).
    item_dropout: float = 0.0
    # Predict from history + experts + recent items (True) or from the recent items alone.
    predict_with_full_item_seq: bool = True
    # Score users through the expert cache (compress + predict) instead of the full masked pass.
    use_cache: bool = True


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

    def training_outputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        item_ids, targets = batch["input_ids"], batch["target_ids"]
        history = self._history_length()
        if self.training and self.options.item_dropout > 0:
            drop = torch.rand(item_ids.shape, device=item_ids.device) < self.options.item_dropout
            drop[:, history:] = False
            item_ids = item_ids.masked_fill(drop, 0)
        hidden = self.model.item_hidden_states(item_ids, batch.get("timestamps"), batch.get("user"))
        if not self.options.loss_on_all_items:
            targets = targets.clone()
            targets[:, :history] = 0
        return hidden.flatten(0, 1), targets.flatten()

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.training_outputs(batch)

    def user_embeddings(self, batch: dict[str, Tensor], use_cache: bool | None = None) -> Tensor:
        item_ids, times, users = batch["input_ids"], batch.get("timestamps"), batch.get("user")
        history = self._history_length()
        if not self.options.predict_with_full_item_seq:
            item_ids = item_ids.clone()
            item_ids[:, :history] = 0
        use_cache = self.options.use_cache if use_cache is None else use_cache
        if not use_cache:
            return self.model.item_hidden_states(item_ids, times, users)[:, -1]
        cache = self.model.compress(
            item_ids[:, :history], None if times is None else times[:, :history], users
        )
        recent_times = None if times is None else times[:, history:]
        return self.model.predict_hidden(cache, item_ids[:, history:], recent_times)[:, -1]

    def embed_items(self, item_ids: Tensor) -> Tensor:
        return self.backbone.embed_items(item_ids)

    def item_embeddings(self) -> Tensor:
        return self.backbone.all_item_embeddings()

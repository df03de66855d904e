"""A backbone plus the recipe that turns batches into training pairs and user vectors.

This is the model contract the trainer, the evaluator and serving rely on (three methods, as in RecBole):
`training_outputs` for the loss, `user_embeddings` for ranking, `item_embeddings` for the candidates. Models
with expert tokens (`persrec.models.experts`) implement the same contract.
"""

from __future__ import annotations

from torch import Tensor, nn

from persrec.models.base import SequenceBackbone


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

    def user_embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        """[B, D]: the hidden state of the most recent item (windows are left-padded)."""
        return self.backbone(batch["input_ids"], batch.get("timestamps"))[:, -1]

    def embed_items(self, item_ids: Tensor) -> Tensor:
        return self.backbone.embed_items(item_ids)

    def item_embeddings(self) -> Tensor:
        """[N + 1, D] candidate vectors; row 0 is padding."""
        return self.backbone.all_item_embeddings()

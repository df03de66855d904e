"""HLLM: an item LLM turns each item's text into an embedding; a user LLM reads the sequence of those embeddings.

The user side is `HFDecoderBackbone` (so expert tokens, masks and the exact expert cache work as for every
backbone); only where item vectors come from changes:

- frozen item LLM (`item_llm_trainable false`): every item is embedded once (cached on disk by the item model,
  text and settings, see `persrec.hf.embedding_cache`) into a table saved with the weights, so a trained model is
  served without the item LLM;
- trainable item LLM: item vectors are computed from text in every step (each distinct item of a call once),
  gradients flowing into the item LLM and its item tokens; outside training all items are embedded once and
  reused while the item LLM's weights stay the same. The table of the final evaluation is saved beside the
  weights (`item_table.safetensors`), so serving needs neither the item LLM nor the item texts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from persrec.models.base import BackboneConfig
from persrec.models.hf_decoder import HFDecoderBackbone, set_hf_gradient_checkpointing, transformer_blocks

if TYPE_CHECKING:
    from persrec.hf.item_encoder import ItemTextEncoder

# The item model's config.json, saved beside an HLLM model's weights.
ITEM_MODEL_CONFIG = "item_model_config.json"
# A trainable item LLM's item vectors as last evaluated, saved beside the weights: serving needs only these.
ITEM_TABLE_FILE = "item_table.safetensors"


class HLLMBackbone(HFDecoderBackbone):
    """User LLM over item-LLM embeddings (width `config.embedding_dim` = the item LLM's hidden size)."""

    def __init__(
        self,
        config: BackboneConfig,
        decoder: nn.Module,
        *,
        item_encoder: ItemTextEncoder | None = None,
        item_table: Tensor | None = None,
        item_model_config: str | None = None,
    ) -> None:
        if (item_encoder is None) == (item_table is None):
            raise ValueError("HLLM needs exactly one of a trainable item encoder or a frozen item table")
        super().__init__(config, decoder)
        # The ID table of the base class is not used: items are known by their text.
        self.item_embedding = None
        self.item_encoder = item_encoder
        self._item_model_config = item_model_config
        if item_table is not None:
            expected = (config.num_items + 1, config.embedding_dim)
            if tuple(item_table.shape) != expected:
                raise ValueError(f"the item table has shape {tuple(item_table.shape)}, expected {expected}")
            self.register_buffer("item_table", item_table.float().clone())
        self._evaluation_table: Tensor | None = None
        self._evaluation_version: tuple[tuple[int, int], ...] = ()

    @property
    def frozen_items(self) -> bool:
        return self.item_encoder is None

    def train(self, mode: bool = True) -> HLLMBackbone:
        if mode:
            self._evaluation_table = None  # the item LLM changes every step from now on: free the table
        return super().train(mode)

    def _weights_version(self) -> tuple[tuple[int, int], ...]:
        """Identifies the item LLM's current weights: every in-place change (an optimiser step, loading a
        state dict) bumps a parameter's version counter, so a table made from older weights is never used."""
        assert self.item_encoder is not None
        return tuple((p.data_ptr(), p._version) for p in self.item_encoder.parameters())

    def item_vectors(self, item_ids: Tensor) -> Tensor:
        if self.frozen_items:
            return self.item_table[item_ids]
        if not self.training:
            return self.all_item_vectors()[item_ids]
        return self.item_encoder.embed(item_ids).float()

    def all_item_vectors(self) -> Tensor:
        if self.frozen_items:
            return self.item_table
        if self.training:  # the item LLM changes every step: nothing to keep
            return self.item_encoder.embed(torch.arange(self.config.num_items + 1)).float()
        version = self._weights_version()
        if self._evaluation_table is None or self._evaluation_version != version:
            self._evaluation_table = self.item_encoder.embed_all().float()
            self._evaluation_version = version
        return self._evaluation_table

    def serving_item_table(self) -> Tensor | None:
        """A trainable item LLM's vectors of every item under the current weights (None when frozen: the table
        is in the weights then), for `persrec.serve`, which ranks vectors only. Every process of a sharded run
        must call it (the item LLM runs)."""
        if self.frozen_items:
            return None
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.all_item_vectors().detach().clone()
        finally:
            self.train(was_training)

    # ---- scale ---------------------------------------------------------------------------------------------
    def shardable_layers(self) -> list[nn.Module]:
        """The user decoder's blocks and, when it trains, the item LLM's (usually the larger of the two)."""
        layers = super().shardable_layers()
        if self.item_encoder is not None:
            layers += transformer_blocks(self.item_encoder.llm)
        return layers

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        super().set_gradient_checkpointing(enabled)
        if self.item_encoder is not None:
            set_hf_gradient_checkpointing(self.item_encoder.llm, enabled)

    def architecture_files(self) -> dict[str, str]:
        files = super().architecture_files()
        if self._item_model_config is not None:
            files[ITEM_MODEL_CONFIG] = self._item_model_config
        return files

"""SASRec (Kang & McAuley, 2018): a pre-LN causal transformer over item-ID embeddings with learned positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persrec.models.base import BackboneConfig, KVCache, SequenceBackbone


class SASRecLayer(nn.Module):
    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.heads = config.num_heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.output = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        ffn_dim = config.ffn_dim or dim
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(ffn_dim, dim)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.attn_dropout = config.attn_dropout

    def forward(
        self, x: Tensor, mask: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: [B, L, D]; mask: [B, L, S] bool with S = cached + L."""
        batch, length, dim = x.shape
        q, k, v = (
            self.qkv(self.attention_norm(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        )
        present = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.dropout(self.output(attended.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.dropout(self.ffn(self.ffn_norm(x))), present


class SASRec(SequenceBackbone):
    def __init__(self, config: BackboneConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(SASRecLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.embedding_dim)

    def _layers_forward(
        self,
        hidden: Tensor,
        mask: Tensor,
        positions: Tensor,
        timestamps: Tensor | None,
        cache: KVCache | None,
        return_cache: bool,
    ) -> tuple[Tensor, KVCache | None]:
        keys, values = [], []
        for index, layer in enumerate(self.layers):
            past = None if cache is None else (cache.keys[index], cache.values[index])
            hidden, (k, v) = layer(hidden, mask, past)
            keys.append(k)
            values.append(v)
        hidden = self.final_norm(hidden)
        if not return_cache:
            return hidden, None
        valid = torch.ones_like(positions, dtype=torch.bool)
        return hidden, KVCache(keys, values, positions, timestamps, valid)

"""HSTU (Zhai et al., 2024): pointwise SiLU attention with gating, as in DESIGN §2.

Per layer: `u, v, q, k = split(SiLU(W · LN(x)))`, `A = SiLU(q kᵀ + bias) / n_max` under the mask,
`x + W_o(dropout(LN(A v) ⊙ u))`. The normaliser is the fixed maximum sequence length, never the number of
queries, so running the recent window against an expert cache gives exactly the scores of the full pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persrec.models.base import BackboneConfig, KVCache, SequenceBackbone
from persrec.models.hstu_attention import hstu_attention, hstu_attention_reference


class RelativeBias(nn.Module):
    """Learned bias on relative position and on log-bucketed time gaps, shared by all heads of one layer."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.max_positions = config.max_positions
        self.time_buckets = config.time_buckets
        self.position_bias = (
            nn.Parameter(torch.zeros(2 * config.max_positions - 1)) if config.relative_position_bias else None
        )
        self.time_bias = (
            nn.Parameter(torch.zeros(config.time_buckets + 1)) if config.relative_time_bias else None
        )

    def forward(
        self,
        query_positions: Tensor,
        key_positions: Tensor,
        query_times: Tensor | None,
        key_times: Tensor | None,
    ) -> Tensor:
        """Positions [B, L] / [B, S], times the same or None -> bias [B, L, S]."""
        bias = query_positions.new_zeros((), dtype=torch.float32)
        if self.position_bias is not None:
            offset = key_positions[:, None, :] - query_positions[:, :, None] + self.max_positions - 1
            bias = bias + self.position_bias[offset.clamp_(0, 2 * self.max_positions - 2)]
        if self.time_bias is not None:
            if query_times is None or key_times is None:
                raise ValueError("relative_time_bias is enabled but the batch carries no timestamps")
            gap = (query_times[:, :, None] - key_times[:, None, :]).abs().clamp_(min=1).float()
            # Buckets of log-time (base 2, as 0.301 ≈ log10 2 in the original formulation).
            bucket = (gap.log2()).long().clamp_(0, self.time_buckets)
            bias = bias + self.time_bias[bucket]
        return bias


class HSTULayer(nn.Module):
    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        dim, heads = config.embedding_dim, config.num_heads
        self.heads = heads
        self.qk_dim = config.qk_dim or dim // heads
        self.v_dim = config.v_dim or dim // heads
        self.uvqk = nn.Linear(dim, heads * (2 * self.v_dim + 2 * self.qk_dim))
        self.input_norm = nn.LayerNorm(dim)
        self.attention_norm = nn.LayerNorm(heads * self.v_dim)
        self.output = nn.Linear(heads * self.v_dim, dim)
        self.dropout = nn.Dropout(config.dropout)
        self.attn_dropout = config.attn_dropout
        self.normaliser = float(config.max_positions)
        self.attention_implementation = config.attention_implementation
        uses_bias = config.relative_position_bias or config.relative_time_bias
        self.relative_bias = RelativeBias(config) if uses_bias else None

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, -1).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        positions: Tensor,
        key_positions: Tensor,
        times: Tensor | None,
        key_times: Tensor | None,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: [B, L, D]; mask: [B, L, S] with S = cached + L; returns the new x and this step's (k, v)."""
        hv, hq = self.heads * self.v_dim, self.heads * self.qk_dim
        u, v, q, k = F.silu(self.uvqk(self.input_norm(x))).split([hv, hv, hq, hq], dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # [B, H, L, d]
        present = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        bias = None
        if self.relative_bias is not None:
            bias = self.relative_bias(positions, key_positions, times, key_times)
        if self.training and self.attn_dropout > 0:
            # Dropout on attention weights needs them materialised: only the reference path has them.
            attended = hstu_attention_reference(q, k, v, mask, bias, self.normaliser, self.attn_dropout)
        else:
            attended = hstu_attention(q, k, v, mask, bias, self.normaliser, self.attention_implementation)
        batch, length, _ = x.shape
        attended = attended.transpose(1, 2).reshape(batch, length, hv)
        return x + self.output(self.dropout(self.attention_norm(attended) * u)), present


class HSTU(SequenceBackbone):
    """Item-ID HSTU. Hidden states are not normalised here: the loss and the scorer use cosine similarity."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(config.num_layers))

    def _layer_context(self, positions: Tensor, timestamps: Tensor | None, cache: KVCache | None) -> dict:
        key_positions, key_times = positions, timestamps
        if cache is not None:
            key_positions = torch.cat([cache.positions, positions], dim=1)
            if timestamps is not None and cache.timestamps is not None:
                key_times = torch.cat([cache.timestamps, timestamps], dim=1)
        return {
            "positions": positions,
            "key_positions": key_positions,
            "times": timestamps,
            "key_times": key_times,
        }

    def _call_layer(
        self,
        layer: nn.Module,
        hidden: Tensor,
        mask: Tensor,
        past: tuple[Tensor, Tensor] | None,
        context: dict,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return layer(
            hidden,
            mask,
            context["positions"],
            context["key_positions"],
            context["times"],
            context["key_times"],
            past,
        )

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
from persrec.models.hstu_attention import GatheredBias, hstu_attention, hstu_attention_reference
from persrec.models.mask_cache import PassMask, mask_tensor
from persrec.models.relative_bias import RelativeBias, RelativeBiasIndex, relative_bias_index
from persrec.models.scratch import scratch


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
        mask: Tensor | PassMask,
        past: tuple[Tensor, Tensor] | None,
        bias_index: RelativeBiasIndex | None = None,
        keep_present: bool = True,
        output_rows: int | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: [B, L, D]; mask: [B, L, S] with S = cached + L; bias_index: the pass's relative-bias index (needed
        when the layer has a relative bias); keep_present False: the caller drops this step's (k, v) before
        the next pass; output_rows n: only the last n rows of the new x are wanted (the queries of the others
        are skipped; keys and values still cover every row). Returns the new x and this step's (k, v)."""
        hv, hq = self.heads * self.v_dim, self.heads * self.qk_dim
        normed = self.input_norm(x)
        if torch.is_grad_enabled():
            projected = F.silu(self.uvqk(normed))
        else:
            # In place when no graph is recorded (a fresh output costs as much again as the SiLU), and, when the
            # caller keeps no key/values, into a scratch slot that every layer and pass reuses.
            batch, length, _ = normed.shape
            shape = (batch * length, self.uvqk.out_features)
            if keep_present:
                out = normed.new_empty(shape)
            else:
                out = scratch("hstu projection", shape, normed.dtype, normed.device)
            projected = torch.addmm(
                self.uvqk.bias, normed.reshape(batch * length, -1), self.uvqk.weight.t(), out=out
            )
            projected = F.silu(projected, inplace=True).view(batch, length, -1)
        u, v, q, k = projected.split([hv, hv, hq, hq], dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # [B, H, L, d]
        present = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if output_rows is not None and output_rows < x.shape[1]:
            x, u, q = x[:, -output_rows:], u[:, -output_rows:], q[:, :, -output_rows:]
            mask = PassMask(mask_tensor(mask)[:, -output_rows:])
            if bias_index is not None:
                bias_index = RelativeBiasIndex(bias_index.index[:, -output_rows:], bias_index.keys)
        bias = None
        if self.relative_bias is not None:
            if bias_index is None:
                raise ValueError("this HSTU layer has a relative bias: pass the pass's relative_bias_index")
            bias = self.relative_bias(bias_index, x.shape[0])
        if self.training and self.attn_dropout > 0:
            # Dropout on attention weights needs them materialised: only the reference path has them.
            dense = bias.dense() if isinstance(bias, GatheredBias) else bias
            attended = hstu_attention_reference(
                q, k, v, mask_tensor(mask), dense, self.normaliser, self.attn_dropout
            )
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
        """The relative-bias index of the pass (bucketing time gaps costs several passes over [B, L, S]: once
        per pass instead of once per layer), or none when the model has no relative bias."""
        config = self.config
        if not (config.relative_position_bias or config.relative_time_bias):
            return {"bias_index": None}
        key_positions, key_times = positions, timestamps
        if cache is not None:
            key_positions = torch.cat([cache.positions, positions], dim=1)
            if timestamps is not None and cache.timestamps is not None:
                key_times = torch.cat([cache.timestamps, timestamps], dim=1)
        index = relative_bias_index(config, positions, key_positions, timestamps, key_times)
        return {"bias_index": index}

    def _call_layer(
        self,
        layer: nn.Module,
        hidden: Tensor,
        mask: PassMask,
        past: tuple[Tensor, Tensor] | None,
        context: dict,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        keep_present, rows = context.get("keep_present", True), context.get("output_rows")
        return layer(hidden, mask, past, context["bias_index"], keep_present, rows)

"""HSTU (Zhai et al., 2024): pointwise SiLU attention with gating, as in DESIGN §2.

Per layer: `u, v, q, k = split(SiLU(W · LN(x)))`, `A = SiLU(q kᵀ + bias) / n_max` under the mask,
`x + W_o(dropout(LN(A v) ⊙ u))`. The normaliser is the fixed maximum sequence length, never the number of
queries, so running the recent window against an expert cache gives exactly the scores of the full pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persrec.models.base import BackboneConfig, KVCache, SequenceBackbone
from persrec.models.hstu_attention import GatheredBias, hstu_attention, hstu_attention_reference
from persrec.models.hstu_native import padded_keys
from persrec.models.mask_cache import PassMask, mask_tensor


@dataclass
class RelativeBiasIndex:
    """Which entry of a layer's bias table every (query, key) pair reads: the part of the relative bias that
    all layers of a pass share (each layer has its own table).

    index: [B, L, S8] int32, or [1, L, S8] when only positions matter and every sequence has the same ones;
    S8 = the S keys rounded up to the fused kernel's alignment. The padding columns read valid entries and are
    hidden by the mask; they let the gathered bias go to the kernel without a padding copy.
    """

    index: Tensor
    keys: int
    # Where layers gather their bias when no gradient is recorded: each layer's bias is dead once its
    # attention returns, so one buffer serves the pass instead of a fresh multi-MiB tensor per layer.
    buffer: Tensor | None = None

    def gather(self, table: Tensor) -> Tensor:
        """table[index] as [B or 1, L, S8]."""
        flat = self.index.reshape(-1)
        if torch.is_grad_enabled() and table.requires_grad:
            return table.index_select(0, flat).view(self.index.shape)
        if self.buffer is None or self.buffer.dtype != table.dtype:
            self.buffer = table.new_empty(flat.shape)
        return torch.index_select(table, 0, flat, out=self.buffer).view(self.index.shape)


# Time buckets are computed in blocks of about this many (query, key) pairs (16 MiB of int32): few enough
# operations that a loaded machine's thread wake-ups do not dominate (each op is a parallel region), and
# temporaries below glibc's largest mmap threshold (32 MiB), so they are reused instead of page-faulted in.
BUCKET_BLOCK = 1 << 22


class RelativeBias(nn.Module):
    """Learned bias on relative position and on log-bucketed time gaps, shared by all heads of one layer.

    With both terms the layer's table is their outer sum, [2P - 1, T + 1] flattened, so one gather per layer
    reads both (`index` = position offset * (T + 1) + time bucket); position-only and time-only tables are the
    terms themselves. Values equal the two separate gathers added, bit for bit.
    """

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

    def table(self) -> Tensor:
        """This layer's flattened bias table, in the order `relative_bias_index` counts entries."""
        if self.position_bias is not None and self.time_bias is not None:
            return (self.position_bias[:, None] + self.time_bias[None, :]).reshape(-1)
        table = self.position_bias if self.position_bias is not None else self.time_bias
        assert table is not None, "a RelativeBias without position and time terms"
        return table

    def forward(self, shared: RelativeBiasIndex, batch: int) -> Tensor | GatheredBias:
        """The bias [B, L, S] of this layer: a view of the first S columns of a contiguous [B, L, S8]; without
        autograd a `GatheredBias`, which the tiled attention gathers tile by tile (the others densify it)."""
        table = self.table()

        def dense() -> Tensor:
            bias = shared.gather(table)[:, :, : shared.keys]
            return bias if bias.shape[0] == batch else bias.expand(batch, -1, -1)

        if torch.is_grad_enabled() and table.requires_grad:
            return dense()
        return GatheredBias(table, shared.index, shared.keys, dense)


def relative_bias_index(
    config: BackboneConfig,
    query_positions: Tensor,
    key_positions: Tensor,
    query_times: Tensor | None,
    key_times: Tensor | None,
) -> RelativeBiasIndex:
    """The per-pass index into every layer's `RelativeBias.table()`.

    Positions [B, L] / [B, S] int64, times the same or None. The time bucket is floor(log2(max(|gap|, 1)))
    in float32, clamped to [0, T]; the position offset is key - query + P - 1, clamped to the table.
    """
    keys = key_positions.shape[1]
    pad = padded_keys(keys) - keys
    index = None
    if config.relative_position_bias:
        if not query_positions.is_cuda and _same_rows(query_positions) and _same_rows(key_positions):
            query_positions, key_positions = query_positions[:1], key_positions[:1]  # one [1, L, S8] index
        key_positions = F.pad(key_positions, (0, pad))
        offset = key_positions[:, None, :] - query_positions[:, :, None] + config.max_positions - 1
        index = offset.clamp_(0, 2 * config.max_positions - 2).to(torch.int32)
    if config.relative_time_bias:
        if query_times is None or key_times is None:
            raise ValueError("relative_time_bias is enabled but the batch carries no timestamps")
        if key_times.shape[1] != keys:
            raise ValueError(
                f"relative_time_bias needs a timestamp for every key: {key_times.shape[1]} for {keys} keys "
                "(an expert cache built without timestamps?)"
            )
        scaled = None if index is None else index * (config.time_buckets + 1)
        index = _time_buckets(query_times, F.pad(key_times, (0, pad)), config.time_buckets, scaled)
    assert index is not None, "relative_bias_index without position or time bias"
    return RelativeBiasIndex(index, keys)


def _time_buckets(query_times: Tensor, key_times: Tensor, buckets: int, offset: Tensor | None) -> Tensor:
    """floor(log2(float32(max(|tq - tk|, 1)))) clamped to [0, buckets], plus `offset` ([1 or B, L, S] int32):
    [B, L, S] int32 from query times [B, L] and key times [B, S].

    Computed in blocks of about BUCKET_BLOCK pairs, which bounds the temporaries, and in int32 where every gap
    fits, which gives the same integers at half the memory traffic of int64.
    """
    batch, length, keys = query_times.shape[0], query_times.shape[1], key_times.shape[1]
    low = torch.minimum(query_times.min(), key_times.min())
    high = torch.maximum(query_times.max(), key_times.max())
    if int(high - low) < 2**31:
        query_times, key_times = (query_times - low).to(torch.int32), (key_times - low).to(torch.int32)
    out = torch.empty(batch, length, keys, dtype=torch.int32, device=query_times.device)
    rows = max(1, BUCKET_BLOCK // keys)  # (sequence, query) rows per block
    per_block = max(1, rows // length)  # whole sequences per block, or one sequence in row blocks
    rows = length if per_block > 1 else min(length, rows)
    gap = query_times.new_empty(per_block * rows * keys)
    log = torch.empty(per_block * rows * keys, dtype=torch.float32, device=query_times.device)
    for b0 in range(0, batch, per_block):
        b1 = min(batch, b0 + per_block)
        for i0 in range(0, length, rows):
            i1 = min(length, i0 + rows)
            shape = (b1 - b0, i1 - i0, keys)
            block = torch.sub(
                query_times[b0:b1, i0:i1, None], key_times[b0:b1, None, :], out=_first(gap, shape)
            )
            block.abs_().clamp_(min=1)
            # Buckets of log-time (base 2, as 0.301 ≈ log10 2 in the original formulation).
            logs = _first(log, shape)
            logs.copy_(block)
            logs.log2_()
            target = out[b0:b1, i0:i1]
            target.copy_(logs)  # truncates toward zero, as .long() does
            target.clamp_(0, buckets)
            if offset is not None:
                target.add_(offset[b0:b1, i0:i1] if offset.shape[0] > 1 else offset[:, i0:i1])
    return out


def _first(buffer: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """A contiguous view of the first elements of a flat buffer."""
    return buffer[: shape[0] * shape[1] * shape[2]].view(shape)


def _same_rows(t: Tensor) -> bool:
    """Whether every row of [B, n] equals the first (a host read: CPU tensors only)."""
    return t.shape[0] == 1 or t.stride(0) == 0 or bool((t == t[:1]).all())


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
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: [B, L, D]; mask: [B, L, S] with S = cached + L; bias_index: the pass's relative-bias index (needed
        when the layer has a relative bias). Returns the new x and this step's (k, v)."""
        hv, hq = self.heads * self.v_dim, self.heads * self.qk_dim
        # In place when no graph is recorded: a fresh [B, L, 2(hv + hq)] output costs as much again as the SiLU
        # (ML-1M batch: 6.6 ms vs 3.2 ms per layer); autograd needs the input SiLU would overwrite.
        projected = self.uvqk(self.input_norm(x))
        projected = F.silu(projected, inplace=not torch.is_grad_enabled())
        u, v, q, k = projected.split([hv, hv, hq, hq], dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # [B, H, L, d]
        present = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
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
        return layer(hidden, mask, past, context["bias_index"])

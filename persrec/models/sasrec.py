"""SASRec (Kang & McAuley, 2018): a pre-LN causal transformer over item-ID embeddings with learned positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persrec.models.base import BackboneConfig, SequenceBackbone
from persrec.models.mask_cache import PassMask, any_sequence, derived, mask_tensor

# Query rows per attention call on a CPU. PyTorch's CPU attention kernels visit every key a call is given, so
# the queries are split into blocks and each block only gets the key range its mask rows allow: half the work
# of a causal mask, less under expert tokens (recent items skip the old history). 64 measured best on 2 cores.
QUERY_BLOCK = 64


def _block_ranges(mask: Tensor, rows: int) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1) per block of `rows` queries: the keys any of them may see in any sequence, as one
    range. A block that sees nothing keeps every key, so it behaves exactly as an unsplit call would."""
    length, keys = mask.shape[1], mask.shape[2]
    seen = any_sequence(mask)  # [L, S]
    blocks = -(-length // rows)
    padded = F.pad(seen, (0, 0, 0, blocks * rows - length)).view(blocks, rows, keys).any(1)  # [blocks, S]
    any_key = padded.any(1)
    first = padded.to(torch.uint8).argmax(1)
    last = keys - 1 - padded.flip(1).to(torch.uint8).argmax(1)
    ranges = []
    for block, (visible, k0, k1) in enumerate(
        zip(any_key.tolist(), first.tolist(), last.tolist(), strict=True)
    ):
        q0, q1 = block * rows, min(length, (block + 1) * rows)
        ranges.append((q0, q1, k0, k1 + 1) if visible else (q0, q1, 0, keys))
    return ranges


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | PassMask, dropout_p: float) -> Tensor:
    """Scaled dot-product attention under a boolean mask [B, L, S]: q [B, H, L, d], k/v [B, H, S, d].

    On a CPU without attention dropout it runs in query blocks over their visible key ranges (same result up to
    float rounding); otherwise (GPU kernels, or dropout, whose random stream must not depend on the blocking)
    in one call. The key ranges are read from the mask on the host: once per pass for the backbone's
    `PassMask`, on every call for a bare tensor.
    """
    length = q.shape[2]
    tensor = mask_tensor(mask)
    if q.is_cuda or dropout_p > 0 or length <= QUERY_BLOCK:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=tensor[:, None], dropout_p=dropout_p)
    ranges = derived(mask, ("query blocks", QUERY_BLOCK), lambda: _block_ranges(tensor, QUERY_BLOCK))
    blocks = [
        F.scaled_dot_product_attention(
            q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], attn_mask=tensor[:, None, q0:q1, k0:k1]
        )
        for q0, q1, k0, k1 in ranges
    ]
    return torch.cat(blocks, dim=2)


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
        self, x: Tensor, mask: Tensor | PassMask, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: [B, L, D]; mask: [B, L, S] bool with S = cached + L."""
        batch, length, dim = x.shape
        q, k, v = (
            self.qkv(self.attention_norm(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        )
        present = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        attended = masked_attention(q, k, v, mask, self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(self.output(attended.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.dropout(self.ffn(self.ffn_norm(x))), present


class SASRec(SequenceBackbone):
    def __init__(self, config: BackboneConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(SASRecLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.embedding_dim)

    def _call_layer(
        self,
        layer: nn.Module,
        hidden: Tensor,
        mask: PassMask,
        past: tuple[Tensor, Tensor] | None,
        context: dict,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return layer(hidden, mask, past)

    def _output_norm(self, hidden: Tensor) -> Tensor:
        return self.final_norm(hidden)

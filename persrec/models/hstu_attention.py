"""HSTU pointwise attention: `SiLU(q kᵀ + bias) / n_max`, masked, times v.

Two implementations with identical results: `hstu_attention_reference` is the readable definition; the tiled
autograd function computes the same thing in cache-sized tiles and recomputes the [L, L] scores in the backward
pass instead of storing them. HSTU's heads are narrow, so the work is dominated by elementwise passes over the
score matrix; keeping each tile in cache and never materialising [B, H, L, L] is what makes long sequences
affordable on a CPU. `hstu_attention` picks one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Score tile size: measured best around 1 MiB (the per-core L2) on the 2-core EPYC we develop on.
TILE_BYTES = 1024 * 1024


def hstu_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    bias: Tensor | None,
    normaliser: float,
    dropout: float = 0.0,
) -> Tensor:
    """q: [B, H, L, dk]; k: [B, H, S, dk]; v: [B, H, S, dv]; mask: [B, L, S] bool; bias: [B, L, S] or None.

    Returns [B, H, L, dv]. Masked entries contribute exactly zero (SiLU has no normalising denominator, so
    masking is a multiplication, not a -inf fill). `dropout` acts on the attention weights (training only:
    callers pass 0 in eval mode).
    """
    scores = q @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + bias[:, None]
    weights = F.silu(scores) * mask[:, None].to(scores.dtype) / normaliser
    if dropout > 0:
        weights = F.dropout(weights, p=dropout)
    return weights @ v


def _tiles(batch: int, heads: int, length: int, keys: int, itemsize: int) -> list[tuple[int, int, int, int]]:
    """(batch index, query start, query end, key end) tiles whose [H, rows, S] score block fits in TILE_BYTES.

    Masks here are always causal in the last `length` key columns (a query never sees a later token), so keys
    after the tile's last query are skipped: about half the work of a plain causal sequence.
    """
    rows = max(1, min(length, TILE_BYTES // max(1, heads * keys * itemsize)))
    offset = keys - length
    return [
        (b, start, min(start + rows, length), offset + min(start + rows, length))
        for b in range(batch)
        for start in range(0, length, rows)
    ]


class _TiledHSTUAttention(torch.autograd.Function):
    """Tiled forward/backward. Products are arranged so the long axis (keys or queries) is the output's
    inner dimension, e.g. outᵀ = vᵀ · weightsᵀ rather than weights · v: with 8-wide heads that layout runs
    several times faster in CPU GEMM kernels. Gradients are accumulated transposed and flipped back once."""

    @staticmethod
    def forward(ctx, q, k, v, mask, bias, normaliser):  # noqa: D102
        k_t, v_t = k.transpose(-1, -2).contiguous(), v.transpose(-1, -2).contiguous()
        out_t = q.new_empty(*v_t.shape[:-1], q.shape[2])  # [B, H, dv, L]
        keep_all = mask.to(q.dtype)
        for b, lo, hi, end in _tiles(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.element_size()):
            scores = torch.matmul(q[b, :, lo:hi], k_t[b, :, :, :end])  # [H, rows, end]
            if bias is not None:
                scores += bias[b, lo:hi, :end]
            weights = F.silu(scores, inplace=True).mul_(keep_all[b, lo:hi, :end])
            torch.matmul(v_t[b, :, :, :end], weights.transpose(-1, -2), out=out_t[b, :, :, lo:hi])
        ctx.save_for_backward(q, k_t, v_t, mask, bias)
        ctx.normaliser = normaliser
        return out_t.transpose(-1, -2).div_(normaliser)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k_t, v_t, mask, bias = ctx.saved_tensors
        q_t = q.transpose(-1, -2).contiguous()
        # The normaliser is folded into grad_out once instead of into every score tile.
        grad_out = grad_out.div(ctx.normaliser).contiguous()
        grad_out_t = grad_out.transpose(-1, -2).contiguous()
        grad_q_t, grad_k_t, grad_v_t = torch.zeros_like(q_t), torch.zeros_like(k_t), torch.zeros_like(v_t)
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[4] else None
        keep_all = mask.to(q.dtype)
        for b, lo, hi, end in _tiles(q.shape[0], q.shape[1], q.shape[2], k_t.shape[3], q.element_size()):
            keep = keep_all[b, lo:hi, :end]
            scores = torch.matmul(q[b, :, lo:hi], k_t[b, :, :, :end])
            if bias is not None:
                scores += bias[b, lo:hi, :end]
            sig = torch.sigmoid(scores)
            weights = scores * sig
            # d silu(s)/ds = sig * (1 + s - silu(s)), built in the score buffer before weights are masked.
            silu_grad = scores.sub_(weights).add_(1).mul_(sig).mul_(keep)
            weights.mul_(keep)
            grad_v_t[b, :, :, :end] += torch.matmul(grad_out_t[b, :, :, lo:hi], weights)
            grad_scores = torch.matmul(grad_out[b, :, lo:hi], v_t[b, :, :, :end]).mul_(silu_grad)
            torch.matmul(k_t[b, :, :, :end], grad_scores.transpose(-1, -2), out=grad_q_t[b, :, :, lo:hi])
            grad_k_t[b, :, :, :end] += torch.matmul(q_t[b, :, :, lo:hi], grad_scores)
            if grad_bias is not None:
                grad_bias[b, lo:hi, :end] = grad_scores.sum(0)
        flip = lambda t: t.transpose(-1, -2)  # noqa: E731
        return flip(grad_q_t), flip(grad_k_t), flip(grad_v_t), None, grad_bias, None


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    bias: Tensor | None,
    normaliser: float,
    implementation: str = "auto",
) -> Tensor:
    """Dispatch between the tiled path (CPU default) and the reference path (CUDA default, or on request).

    On a GPU the reference path's large batched kernels win; on a CPU the tiled path keeps the work in cache.
    """
    if implementation == "auto":
        implementation = "reference" if q.is_cuda else "tiled"
    if implementation == "reference":
        return hstu_attention_reference(q, k, v, mask, bias, normaliser)
    if implementation == "tiled":
        return _TiledHSTUAttention.apply(q, k, v, mask, bias, normaliser)
    raise ValueError(
        f"unknown HSTU attention implementation {implementation!r}; expected auto, reference or tiled"
    )

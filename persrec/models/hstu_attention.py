"""HSTU pointwise attention: `SiLU(q kᵀ + bias) / n_max`, masked, times v.

Three implementations with the same results up to float rounding: `hstu_attention_reference` is the readable
definition; the tiled autograd function computes it from PyTorch ops in cache-sized tiles, recomputing the
scores in the backward pass instead of storing them, and visits only the key blocks the mask lets a tile see;
the fused C kernel of `persrec.models.hstu_native` does the same per score in registers. HSTU's heads are
narrow, so the work is dominated by passes over the score matrix: never materialising [B, H, L, S], skipping
hidden key blocks and making few passes is what makes long sequences affordable on a CPU. `hstu_attention`
picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from persrec.models import hstu_epilogue, hstu_native
from persrec.models.mask_cache import PassMask, any_sequence, derived, every_sequence, mask_tensor

# Score tile size. Per-element costs were flat from 1 to 4 MiB on the 2-core EPYC we develop on (1 MiB L2 per
# core); smaller tiles pay more Python and small-GEMM overhead per element.
TILE_BYTES = 2 * 1024 * 1024
# Query rows a tile aims for: with fewer rows the accumulating GEMMs (inner size = rows) get inefficient, so
# a tile covers fewer batch elements instead.
TILE_ROWS = 32
# Key columns are visited and masked in blocks of this many: a block no query of a tile may see is skipped,
# a block every query of every sequence sees needs no mask.
KEY_BLOCK = 16


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


@dataclass(frozen=True)
class GatheredBias:
    """A relative bias still in its gather form: `table[index]` over (query, key) pairs.

    Without autograd the tiled path gathers each tile's bias where it adds it, so the bias never exists as a
    [B, L, S] tensor written once and read back per layer (more memory traffic than the gather itself: 13 of
    the 74 ms of an ML-1M inference pass). The other paths call `dense()`.
    """

    table: Tensor  # [E] this layer's flattened bias table
    index: Tensor  # [B or 1, L, S8] int32 entries of `table`, shared by every layer of the pass
    keys: int  # S: the real key columns of `index`
    dense: Callable[[], Tensor]  # the bias as [B, L, S]

    def tile(self, g0: int, g1: int, q0: int, q1: int, k0: int, k1: int, buffer: Tensor) -> Tensor:
        """The bias of batch elements [g0, g1) (one broadcast row when the index is shared), queries [q0, q1),
        keys [k0, k1): [g1 - g0 or 1, q1 - q0, k1 - k0], gathered into `buffer`."""
        rows = self.index[g0:g1] if self.index.shape[0] > 1 else self.index
        index = rows[:, q0:q1, k0:k1]
        flat = index.reshape(-1)
        return torch.index_select(self.table, 0, flat, out=buffer[: flat.numel()]).view(index.shape)


@dataclass(frozen=True)
class _Tile:
    """Queries [q0, q1) against keys [k0, k1); `strips` = (c0, c1, keep) for the key columns k0 + [c0, c1) that
    some query may not see, with keep = the mask there as 0/1 of the compute dtype, [B, 1, q1 - q0, c1 - c0]."""

    q0: int
    q1: int
    k0: int
    k1: int
    strips: tuple[tuple[int, int, Tensor], ...]


@dataclass(frozen=True)
class _Plan:
    """How one mask is tiled: `group` batch elements per tile, the tiles of one group, the largest tile, and
    the mask itself ([B, L, S] bool) for the score-tile kernel."""

    group: int
    tiles: tuple[_Tile, ...]
    tile_elements: int
    mask: Tensor


def _block_runs(flags: list[bool], first: int, last: int) -> list[tuple[int, int]]:
    """Maximal runs [j0, j1) of True in flags[first:last + 1]."""
    runs: list[tuple[int, int]] = []
    for j in range(first, last + 1):
        if flags[j]:
            if runs and runs[-1][1] == j:
                runs[-1] = (runs[-1][0], j + 1)
            else:
                runs.append((j, j + 1))
    return runs


def _build_plan(mask: Tensor, heads: int, dtype: torch.dtype) -> _Plan:
    batch, length, keys = mask.shape
    per_row = heads * keys * torch.empty((), dtype=dtype).element_size()
    rows = TILE_BYTES // (batch * per_row)
    if rows >= min(length, TILE_ROWS):
        group, rows = batch, min(length, rows)
    else:
        rows = max(1, min(length, TILE_ROWS, TILE_BYTES // per_row))
        group = max(1, min(batch, TILE_BYTES // (rows * per_row)))
    block = KEY_BLOCK
    n_rows, n_cols = -(-length // rows), -(-keys // block)
    pad = (0, n_cols * block - keys, 0, n_rows * rows - length)
    # Padding counts as hidden for "some query sees the block" and as visible for "every query sees it", so a
    # ragged last block is judged by its real entries only.
    seen = (
        F.pad(any_sequence(mask), pad, value=False).view(n_rows, rows, n_cols, block).any(3).any(1).tolist()
    )
    full = (
        F.pad(every_sequence(mask), pad, value=True).view(n_rows, rows, n_cols, block).all(3).all(1).tolist()
    )
    tiles = []
    for t in range(n_rows):
        visible = [j for j in range(n_cols) if seen[t][j]]
        if not visible:
            continue  # no query of the tile sees any key: its outputs and gradients stay zero
        q0, q1 = t * rows, min(length, (t + 1) * rows)
        k0, k1 = visible[0] * block, min(keys, (visible[-1] + 1) * block)
        partial = [not f for f in full[t]]
        strips = []
        for j0, j1 in _block_runs(partial, visible[0], visible[-1]):
            c0, c1 = j0 * block, min(keys, j1 * block)
            strips.append((c0 - k0, c1 - k0, mask[:, None, q0:q1, c0:c1].to(dtype)))
        tiles.append(_Tile(q0, q1, k0, k1, tuple(strips)))
    largest = max(((tile.q1 - tile.q0) * (tile.k1 - tile.k0) for tile in tiles), default=0)
    return _Plan(group, tuple(tiles), group * heads * largest, mask)


def _plan(mask: Tensor | PassMask, tensor: Tensor, heads: int, dtype: torch.dtype) -> _Plan:
    """The tiling of `tensor` ([B, L, S] bool, `mask` broadcast to the call's shape), once per pass."""
    key = ("tiled plan", tuple(tensor.shape), heads, dtype, TILE_BYTES, TILE_ROWS, KEY_BLOCK)
    return derived(mask, key, lambda: _build_plan(tensor, heads, dtype))


def _apply_strips(tile_values: Tensor, tile: _Tile, g0: int, g1: int, heads: int) -> None:
    """Zero the entries the mask hides, in the partially visible column strips only."""
    shaped = tile_values.view(g1 - g0, heads, tile.q1 - tile.q0, tile.k1 - tile.k0)
    for c0, c1, keep in tile.strips:
        shaped[..., c0:c1].mul_(keep[g0:g1])


class _TiledHSTUAttention(torch.autograd.Function):
    """Tiled forward/backward over (batch group, query rows) tiles with per-tile key ranges.

    Layouts: batch and heads are flattened into one GEMM batch; products are arranged so the long axis (keys
    or queries) is the output's inner dimension, e.g. outᵀ = vᵀ · weightsᵀ rather than weights · v: with
    8-wide heads that layout runs several times faster in CPU GEMM kernels. Score-sized buffers are allocated
    once per call and reused by every tile (a fresh multi-MiB tensor per tile costs page faults), and the
    SiLU gradient is one fused pass.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan, bias, normaliser):  # noqa: D102
        batch, heads, length, dk = q.shape
        keys, dv = k.shape[2], v.shape[3]
        q_rows = q.reshape(batch * heads, length, dk)
        k_t = k.transpose(-1, -2).reshape(batch * heads, dk, keys)
        v_t = v.transpose(-1, -2).reshape(batch * heads, dv, keys)
        out_t = q.new_zeros(batch * heads, dv, length)
        work = q.new_empty(plan.tile_elements)
        fused = _fusable(q, bias, plan.mask)
        gathering = isinstance(bias, GatheredBias) and not fused
        bias_work = q.new_empty(plan.tile_elements) if gathering else None
        for g0 in range(0, batch, plan.group):
            g1 = min(batch, g0 + plan.group)
            h0, h1 = g0 * heads, g1 * heads
            for tile in plan.tiles:
                if fused:
                    scores = _fused_scores(q_rows, k_t, bias, plan.mask, work, tile, g0, g1, heads)
                else:
                    scores = _scores(q_rows, k_t, bias, work, tile, g0, g1, heads, bias_work)
                    F.silu(scores, inplace=True)
                    _apply_strips(scores, tile, g0, g1, heads)
                out_t[h0:h1, :, tile.q0 : tile.q1] = torch.bmm(v_t[h0:h1, :, tile.k0 : tile.k1], scores.mT)
        # A GatheredBias comes only without autograd (see HSTULayer): there is no backward to save it for.
        ctx.save_for_backward(q_rows, k_t, v_t, bias if isinstance(bias, Tensor) else None)
        ctx.plan, ctx.normaliser, ctx.heads = plan, normaliser, heads
        return out_t.view(batch, heads, dv, length).transpose(-1, -2).div_(normaliser)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q_rows, k_t, v_t, bias = ctx.saved_tensors
        plan, heads = ctx.plan, ctx.heads
        batch = q_rows.shape[0] // heads
        length, dk, dv, keys = q_rows.shape[1], q_rows.shape[2], v_t.shape[1], k_t.shape[2]
        # The normaliser is folded into grad_out once instead of into every score tile.
        grad_rows = grad_out.div(ctx.normaliser).reshape(batch * heads, length, dv)
        grad_rows_t = grad_rows.transpose(1, 2).contiguous()
        q_t = q_rows.transpose(1, 2).contiguous()
        grad_q_t, grad_k_t, grad_v_t = q_t.new_zeros(q_t.shape), torch.zeros_like(k_t), torch.zeros_like(v_t)
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[4] else None
        work = q_rows.new_empty(3, plan.tile_elements)
        narrow = q_rows.new_empty(plan.group * heads * max(dk, dv) * keys)
        for g0 in range(0, batch, plan.group):
            g1 = min(batch, g0 + plan.group)
            h0, h1 = g0 * heads, g1 * heads
            for tile in plan.tiles:
                q0, q1, k0, k1 = tile.q0, tile.q1, tile.k0, tile.k1
                scores = _scores(q_rows, k_t, bias, work[0], tile, g0, g1, heads)
                grad_scores = torch.bmm(
                    grad_rows[h0:h1, q0:q1], v_t[h0:h1, :, k0:k1], out=_view(work[1], scores.shape)
                )
                weights = torch.ops.aten.silu.out(scores, out=_view(work[2], scores.shape))
                # d silu(s)/ds times the incoming gradient, in place (one fused pass).
                torch.ops.aten.silu_backward.grad_input(grad_scores, scores, grad_input=grad_scores)
                _apply_strips(weights, tile, g0, g1, heads)
                _apply_strips(grad_scores, tile, g0, g1, heads)
                grad_v_t[h0:h1, :, k0:k1] += torch.bmm(
                    grad_rows_t[h0:h1, :, q0:q1], weights, out=_view(narrow, (h1 - h0, dv, k1 - k0))
                )
                grad_q_t[h0:h1, :, q0:q1] = torch.bmm(k_t[h0:h1, :, k0:k1], grad_scores.mT)
                grad_k_t[h0:h1, :, k0:k1] += torch.bmm(
                    q_t[h0:h1, :, q0:q1], grad_scores, out=_view(narrow, (h1 - h0, dk, k1 - k0))
                )
                if grad_bias is not None:
                    per_head = grad_scores.view(g1 - g0, heads, q1 - q0, k1 - k0)
                    grad_bias[g0:g1, q0:q1, k0:k1] += per_head.sum(1)

        def unflatten(t: Tensor) -> Tensor:
            return t.view(batch, heads, t.shape[1], t.shape[2]).transpose(-1, -2)

        return unflatten(grad_q_t), unflatten(grad_k_t), unflatten(grad_v_t), None, grad_bias, None


def _broadcast_mask(mask: Tensor | PassMask, q: Tensor, k: Tensor) -> Tensor:
    """The mask as [B, L, S] (a broadcast mask expanded: both CPU paths index it per batch element)."""
    tensor = mask_tensor(mask)
    shape = (q.shape[0], q.shape[2], k.shape[2])
    return tensor if tensor.shape == shape else tensor.expand(shape)


def _view(buffer: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """A contiguous view of the first elements of a flat work buffer."""
    count = 1
    for size in shape:
        count *= size
    return buffer[:count].view(shape)


def _scores(
    q_rows: Tensor,
    k_t: Tensor,
    bias: Tensor | GatheredBias | None,
    buffer: Tensor,
    tile: _Tile,
    g0: int,
    g1: int,
    heads: int,
    bias_work: Tensor | None = None,
) -> Tensor:
    """Pre-activation scores of one tile for batch elements [g0, g1): [(g1 - g0) * H, rows, keys]; a
    `GatheredBias` is gathered for the tile into `bias_work`."""
    h0, h1 = g0 * heads, g1 * heads
    rows, cols = tile.q1 - tile.q0, tile.k1 - tile.k0
    scores = torch.bmm(
        q_rows[h0:h1, tile.q0 : tile.q1],
        k_t[h0:h1, :, tile.k0 : tile.k1],
        out=_view(buffer, (h1 - h0, rows, cols)),
    )
    if isinstance(bias, GatheredBias):
        assert bias_work is not None, "a GatheredBias needs a work buffer"
        tile_bias = bias.tile(g0, g1, tile.q0, tile.q1, tile.k0, tile.k1, bias_work)
        scores.view(g1 - g0, heads, rows, cols).add_(tile_bias[:, None])
    elif bias is not None:
        scores.view(g1 - g0, heads, rows, cols).add_(bias[g0:g1, None, tile.q0 : tile.q1, tile.k0 : tile.k1])
    return scores


def _fusable(q: Tensor, bias: Tensor | GatheredBias | None, mask: Tensor) -> bool:
    """Whether the score-tile kernel can take this call: float32 throughout, rows with unit column stride."""
    if not hstu_epilogue.available(q) or mask.dtype != torch.bool or mask.stride(-1) != 1:
        return False
    if isinstance(bias, GatheredBias):
        table, index = bias.table, bias.index
        contiguous = table.is_contiguous() and index.stride(-1) == 1
        return table.dtype == torch.float32 and index.dtype == torch.int32 and contiguous
    return bias is None or (bias.dtype == torch.float32 and bias.stride(-1) == 1)


def _fused_scores(
    q_rows: Tensor,
    k_t: Tensor,
    bias: Tensor | GatheredBias | None,
    mask: Tensor,
    buffer: Tensor,
    tile: _Tile,
    g0: int,
    g1: int,
    heads: int,
) -> Tensor:
    """SiLU(scores + bias) * mask of one tile, [(g1 - g0) * H, rows, keys]: the product, then one pass of the
    score-tile kernel (the mask only where some entry of the tile is hidden)."""
    h0, h1 = g0 * heads, g1 * heads
    q0, q1, k0, k1 = tile.q0, tile.q1, tile.k0, tile.k1
    scores = torch.bmm(
        q_rows[h0:h1, q0:q1], k_t[h0:h1, :, k0:k1], out=_view(buffer, (h1 - h0, q1 - q0, k1 - k0))
    )
    table = index = dense = None
    if isinstance(bias, GatheredBias):
        rows = bias.index[g0:g1] if bias.index.shape[0] > 1 else bias.index
        table, index = bias.table, rows[:, q0:q1, k0:k1]
    elif bias is not None:
        dense = bias[g0:g1, q0:q1, k0:k1]
    hidden = mask[g0:g1, q0:q1, k0:k1] if tile.strips else None
    hstu_epilogue.apply(scores, heads, table=table, index=index, bias=dense, mask=hidden)
    return scores


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | PassMask,
    bias: Tensor | GatheredBias | None,
    normaliser: float,
    implementation: str = "auto",
) -> Tensor:
    """Dispatch between the fused kernel, the tiled path and the reference path.

    auto: reference on a GPU (its large batched kernels win there); on a CPU the fused C kernel of
    `persrec.models.hstu_native` where it applies (float32, narrow heads, AVX2 and a C compiler), else the
    tiled path, which keeps the work in cache. Both CPU paths read a summary of the mask on the host (free on
    a CPU, a sync on a GPU): once per pass when the mask comes as the backbone's `PassMask`, on every call for a
    bare tensor. `native` insists on the fused kernel.
    """
    dtype_probe = bias.table if isinstance(bias, GatheredBias) else bias
    if implementation == "auto":
        if q.is_cuda:
            implementation = "reference"
        else:
            implementation = "native" if hstu_native.supports(q, k, v, dtype_probe) else "tiled"
    if isinstance(bias, GatheredBias) and implementation != "tiled":
        bias = bias.dense()
    if implementation == "reference":
        return hstu_attention_reference(q, k, v, mask_tensor(mask), bias, normaliser)
    if implementation not in ("tiled", "native"):
        raise ValueError(
            f"unknown HSTU attention implementation {implementation!r}; expected auto, native, tiled or reference"
        )
    if implementation == "tiled":
        tensor = _broadcast_mask(mask, q, k)
        return _TiledHSTUAttention.apply(q, k, v, _plan(mask, tensor, q.shape[1], q.dtype), bias, normaliser)
    if not hstu_native.supports(q, k, v, bias):
        raise ValueError(
            "attention_implementation='native' needs float32 CPU tensors, head widths of at most "
            f"{hstu_native.MAX_HEAD_DIM}, an x86-64 CPU with AVX2 and a working C compiler; use auto or tiled"
        )
    return hstu_native.native_hstu_attention(q, k, v, mask, bias, normaliser)

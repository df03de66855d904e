"""HSTU's relative attention bias: a learned bias on relative position and on log-bucketed time gaps.

Each layer has its own table; which entry a (query, key) pair reads is the same in every layer of a pass, so it
is computed once per pass (`relative_bias_index`) and each layer gathers from its table. Computing that index
is several passes over [B, L, S] in PyTorch ops (a subtraction, an absolute value, a logarithm, conversions),
which cost a third of an ML-1M inference pass; on x86-64 CPUs a small C kernel (`persrec.native`) does it in one
pass and gives the same integers.

The time bucket of a gap is floor(log2(max(|t_query - t_key|, 1))), computed exactly on the integers, clamped
to [0, T]; the position offset is key - query + P - 1, clamped to the table.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from persrec import native
from persrec.models.base import BackboneConfig
from persrec.models.hstu_attention import GatheredBias
from persrec.models.hstu_native import padded_keys
from persrec.models.scratch import scratch


@dataclass
class RelativeBiasIndex:
    """Which entry of a layer's bias table every (query, key) pair reads: the part of the relative bias that
    all layers of a pass share (each layer has its own table).

    index: [B, L, S8] int32, or [1, L, S8] when only positions matter and every sequence has the same ones;
    S8 = the S keys rounded up to the fused kernel's alignment. The padding columns read entry 0 and are
    hidden by the mask; they let the gathered bias go to the kernel without a padding copy.
    """

    index: Tensor
    keys: int

    def gather(self, table: Tensor) -> Tensor:
        """table[index] as [B or 1, L, S8]. Without autograd into a scratch slot: each layer's bias is dead once
        its attention returns, so one buffer serves every layer (and pass) instead of a fresh one per layer."""
        flat = self.index.reshape(-1)
        if torch.is_grad_enabled() and table.requires_grad:
            return table.index_select(0, flat).view(self.index.shape)
        buffer = scratch("hstu gathered bias", tuple(flat.shape), table.dtype, table.device)
        return torch.index_select(table, 0, flat, out=buffer).view(self.index.shape)


class RelativeBias(nn.Module):
    """The bias tables of one layer, shared by all its heads.

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

    Positions [B, L] / [B, S] int64, times the same or None (required with the time bias).
    """
    keys = key_positions.shape[1]
    positions, buckets = config.relative_position_bias, config.relative_time_bias
    if buckets:
        if query_times is None or key_times is None:
            raise ValueError("relative_time_bias is enabled but the batch carries no timestamps")
        if key_times.shape[1] != keys:
            raise ValueError(
                f"relative_time_bias needs a timestamp for every key: {key_times.shape[1]} for {keys} keys "
                "(an expert cache built without timestamps?)"
            )
    if (
        positions
        and not query_positions.is_cuda
        and _same_rows(query_positions)
        and _same_rows(key_positions)
    ):
        query_positions, key_positions = query_positions[:1], key_positions[:1]  # one [1, L, S8] index
    inputs = _IndexInputs(
        query_positions if positions else None,
        key_positions if positions else None,
        config.max_positions,
        query_times if buckets else None,
        key_times if buckets else None,
        config.time_buckets,
    )
    index = _native_index(inputs) if not query_positions.is_cuda else None
    return RelativeBiasIndex(_torch_index(inputs) if index is None else index, keys)


@dataclass(frozen=True)
class _IndexInputs:
    """What the index is computed from: positions [B or 1, L] / [B or 1, S] and times [B, L] / [B, S], each
    pair None when its term is off."""

    query_positions: Tensor | None
    key_positions: Tensor | None
    max_positions: int
    query_times: Tensor | None
    key_times: Tensor | None
    time_buckets: int

    def shape(self) -> tuple[int, int, int]:
        """(rows of the index: B, or 1 for shared positions without time; L; S)."""
        if self.query_times is not None and self.key_times is not None:
            return self.query_times.shape[0], self.query_times.shape[1], self.key_times.shape[1]
        assert self.query_positions is not None and self.key_positions is not None, "no position or time bias"
        return self.query_positions.shape[0], self.query_positions.shape[1], self.key_positions.shape[1]


# Time buckets are computed in blocks of about this many (query, key) pairs (16 MiB of int32): few enough
# operations that a loaded machine's thread wake-ups do not dominate (each op is a parallel region), and
# temporaries below glibc's largest mmap threshold (32 MiB), so they are reused instead of page-faulted in.
BUCKET_BLOCK = 1 << 22


def _torch_index(inputs: _IndexInputs) -> Tensor:
    """The index from PyTorch ops (GPUs, and CPUs without the kernel): [B or 1, L, S8] int32."""
    batch, length, keys = inputs.shape()
    qp, kp, qt, kt = inputs.query_positions, inputs.key_positions, inputs.query_times, inputs.key_times
    device = (qp if qp is not None else qt).device
    out = torch.zeros(batch, length, padded_keys(keys), dtype=torch.int32, device=device)
    index = out[:, :, :keys]
    if qp is not None and kp is not None:
        top = 2 * inputs.max_positions - 2
        index.copy_((kp[:, None, :] - qp[:, :, None] + inputs.max_positions - 1).clamp_(0, top))
        if qt is not None:
            index.mul_(inputs.time_buckets + 1)
    if qt is not None and kt is not None:
        _add_time_buckets(index, qt, kt, inputs.time_buckets)
    return out


def _add_time_buckets(out: Tensor, query_times: Tensor, key_times: Tensor, buckets: int) -> None:
    """out [B, L, S] int32 += the time bucket of every (query, key) pair, in blocks of about BUCKET_BLOCK pairs
    (bounded temporaries) and in int32 where every gap fits (half the memory traffic of int64)."""
    batch, length, keys = query_times.shape[0], query_times.shape[1], key_times.shape[1]
    query_times, key_times = _narrow_times(query_times, key_times)
    rows = max(1, BUCKET_BLOCK // keys)  # (sequence, query) rows per block
    per_block = max(1, rows // length)  # whole sequences per block, or one sequence in row blocks
    rows = length if per_block > 1 else min(length, rows)
    gap = query_times.new_empty(per_block * rows * keys)
    for b0 in range(0, batch, per_block):
        b1 = min(batch, b0 + per_block)
        for i0 in range(0, length, rows):
            i1 = min(length, i0 + rows)
            shape = (b1 - b0, i1 - i0, keys)
            block = torch.sub(
                query_times[b0:b1, i0:i1, None], key_times[b0:b1, None, :], out=_first(gap, shape)
            )
            block.abs_().clamp_(min=1)
            out[b0:b1, i0:i1] += _floor_log2(block).clamp_(max=buckets)


def _narrow_times(query_times: Tensor, key_times: Tensor) -> tuple[Tensor, Tensor]:
    """Both as int32 offsets from the earliest time when every gap fits in int32 (the same gaps at half the
    memory traffic), else unchanged."""
    low = torch.minimum(query_times.min(), key_times.min())
    high = torch.maximum(query_times.max(), key_times.max())
    if int(high - low) >= 2**31:
        return query_times, key_times
    return (query_times - low).to(torch.int32), (key_times - low).to(torch.int32)


def _floor_log2(values: Tensor) -> Tensor:
    """floor(log2(v)) of positive integers, exactly, as int32: frexp's exponent of the float64 value, one less
    where rounding to float64 (values above 2^53) reached the next power of two."""
    exponent = torch.frexp(values.to(torch.float64)).exponent - 1
    if values.dtype == torch.int64:
        power = torch.bitwise_left_shift(torch.ones_like(values), exponent.to(torch.int64))
        exponent -= (power > values).to(exponent.dtype)
    return exponent.to(torch.int32)


def _first(buffer: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """A contiguous view of the first elements of a flat buffer."""
    return buffer[: shape[0] * shape[1] * shape[2]].view(shape)


def _same_rows(t: Tensor) -> bool:
    """Whether every row of [B, n] equals the first (a host read: CPU tensors only)."""
    return t.shape[0] == 1 or t.stride(0) == 0 or bool((t == t[:1]).all())


_SOURCE = (
    native.PARALLEL_PRELUDE
    + r"""
#include <string.h>

/* floor(log2(g)) for 1 <= g < 2^31, exactly: the exponent of float32(g), one less where rounding reached the
   next power of two. Written so that the compiler vectorises it (no count-leading-zeros in AVX2). */
static inline int32_t floor_log2_32(int32_t g) {
    float f = (float)g;
    int32_t bits;
    memcpy(&bits, &f, 4);
    int32_t e = (bits >> 23) - 127;
    return e - ((1 << e) > g);
}

static inline int32_t floor_log2_64(int64_t g) { return 63 - __builtin_clzll((uint64_t)g); }

/* One output row (sequence b, query i): out[j] = offset * scale for the keys, 0 for the padding slots. */
static inline void position_row(int32_t *out, int keys, int keys8, const int32_t *key_pos, int32_t query_pos,
                                int positions, int32_t scale) {
    int32_t base = positions - 1 - query_pos, top = 2 * positions - 2;
    for (int j = 0; j < keys; j++) {
        int32_t o = key_pos[j] + base;
        out[j] = (o < 0 ? 0 : (o > top ? top : o)) * scale;
    }
    for (int j = keys; j < keys8; j++) out[j] = 0;
}

/* Rows r = b * length + i of out [rows, keys8] int32. Positions int32 with batch strides qps/kps (0: one row
   for every sequence); positions == 0: no position term. Times with batch strides qts/kts; buckets < 0: no
   time term (the times are then not read). */
#define BIAS_INDEX(NAME, TIME, FLOOR_LOG2)                                                                      \
    void NAME(int64_t u0, int64_t u1, int threads, int length, int keys, int keys8, const int32_t *qpos,        \
              int64_t qps, const int32_t *kpos, int64_t kps, int positions, const TIME *qt, int64_t qts,        \
              const TIME *kt, int64_t kts, int buckets, int32_t *out) {                                        \
        FOR_UNITS(r) {                                                                                         \
            int64_t b = r / length, i = r % length;                                                            \
            int32_t *O = out + r * keys8;                                                                      \
            if (positions > 0)                                                                                 \
                position_row(O, keys, keys8, kpos + b * kps, qpos[b * qps + i], positions,                     \
                             buckets >= 0 ? buckets + 1 : 1);                                                  \
            else                                                                                               \
                memset(O, 0, sizeof(int32_t) * keys8);                                                         \
            if (buckets < 0) continue;                                                                         \
            const TIME *K = kt + b * kts;                                                                      \
            TIME t = qt[b * qts + i];                                                                          \
            for (int j = 0; j < keys; j++) {                                                                   \
                TIME g = t - K[j];                                                                             \
                g = g < 0 ? -g : g;                                                                            \
                int32_t e = FLOOR_LOG2(g < 1 ? 1 : g);                                                         \
                O[j] += e > buckets ? buckets : e;                                                             \
            }                                                                                                  \
        }                                                                                                      \
    }

BIAS_INDEX(bias_index_i32, int32_t, floor_log2_32)
BIAS_INDEX(bias_index_i64, int64_t, floor_log2_64)
"""
)

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_ARGS = [_I64, _I64, _INT, _INT, _INT, _INT, _PTR, _I64, _PTR, _I64, _INT, _PTR, _I64, _PTR, _I64, _INT, _PTR]
_SIGNATURES = {"bias_index_i32": _ARGS, "bias_index_i64": _ARGS}


@functools.cache
def _library() -> ctypes.CDLL | None:
    return native.load("hstu_bias_index", _SOURCE, _SIGNATURES, "the HSTU relative-bias index kernel")


def _native_index(inputs: _IndexInputs) -> Tensor | None:
    """The same index as `_torch_index` from the C kernel, or None where it is unavailable."""
    library = _library()
    if library is None:
        return None
    batch, length, keys = inputs.shape()
    keys8 = padded_keys(keys)
    query_times, key_times = inputs.query_times, inputs.key_times
    kept: list[Tensor] = []  # what the kernel reads stays alive until it returns

    def rows(t: Tensor | None, dtype: torch.dtype) -> tuple[int | None, int]:
        if t is None:
            return None, 0
        t = t.to(dtype).contiguous()
        kept.append(t)
        return t.data_ptr(), (0 if t.shape[0] == 1 else t.shape[1])

    name, time_dtype = "bias_index_i64", torch.int64
    if query_times is not None and key_times is not None:
        query_times, key_times = _narrow_times(query_times, key_times)
        if query_times.dtype == torch.int32:  # the vectorised kernel
            name, time_dtype = "bias_index_i32", torch.int32
    out = scratch("hstu bias index", (batch, length, keys8), torch.int32, torch.device("cpu"))
    positions = inputs.max_positions if inputs.query_positions is not None else 0
    buckets = inputs.time_buckets if query_times is not None else -1
    native.run_parallel(
        library,
        name,
        batch * length,
        length,
        keys,
        keys8,
        *rows(inputs.query_positions, torch.int32),
        *rows(inputs.key_positions, torch.int32),
        positions,
        *rows(query_times, time_dtype),
        *rows(key_times, time_dtype),
        buckets,
        out.data_ptr(),
    )
    return out

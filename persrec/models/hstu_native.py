"""Fused HSTU attention for x86-64 CPUs: a small C kernel, compiled on first use and loaded with ctypes.

Why: HSTU heads are 8 wide, so a score costs 8 multiply-adds in each product but, built from PyTorch ops (the
tiled path in `hstu_attention`), a round trip through memory for every GEMM output, SiLU and gradient. Here each
score, its SiLU, its mask and its contribution to the outputs or gradients are computed in registers, eight
keys at a time, and the backward pass recomputes scores instead of storing them. On the 2-core EPYC we develop
on this roughly halves the attention time of a training step.

Everything here is optional: without a C compiler, without AVX2/FMA, for other dtypes or wide heads,
`supports` says no and `hstu_attention` keeps the tiled PyTorch path. Results equal the reference up to float
rounding (a different summation order and an exp accurate to about 1.3 ulp).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from persrec import native
from persrec.models.mask_cache import PassMask, any_sequence, derived, mask_tensor

# Widest head (query/key or value width) the kernel is compiled for: its per-head vectors live in registers,
# and wide heads are where the tiled path's GEMMs are efficient anyway.
MAX_HEAD_DIM = 32
# The kernel visits keys in blocks of this many; its mask and bias rows are padded to a multiple of it.
KEY_ALIGN = 8

# What every build of the fused kernel shares: head widths, strided views, the key/value packing.
KERNEL_COMMON = r"""
/* DK, DV (query/key and value widths) are compile-time constants so that per-head vectors stay in registers. */
#define C (DK + DV)

/* Element strides of batch, head and row of a [B, H, rows, width] float tensor with a contiguous last dim. */
typedef struct {
    int64_t b, h, row;
} view_t;

static inline const float *row_of(const float *base, view_t s, int64_t bh, int heads, int64_t i) {
    return base + (bh / heads) * s.b + (bh % heads) * s.h + i * s.row;
}

/* kv [BH, SW / W, DK + DV, W]: each block of W key slots holds its keys, then its values, feature-major, so
   the kernels read one contiguous W * C floats per block. Slots past `keys` are zero. Units: batch-head pairs. */
#define DEFINE_PACK(NAME, W)                                                                                   \
    void NAME(int64_t u0, int64_t u1, int threads, int heads, int keys, int keysw, const float *k, view_t ks,  \
              const float *v, view_t vs, float *kv) {                                                          \
        FOR_UNITS(bh) {                                                                                        \
            float *KV = kv + bh * keysw * C;                                                                   \
            for (int j = 0; j < keysw; j++) {                                                                  \
                float *slot = KV + (int64_t)(j / W) * W * C + j % W;                                           \
                const float *kr = j < keys ? row_of(k, ks, bh, heads, j) : 0;                                  \
                const float *vr = j < keys ? row_of(v, vs, bh, heads, j) : 0;                                  \
                for (int d = 0; d < DK; d++) slot[W * d] = kr ? kr[d] : 0.0f;                                  \
                for (int e = 0; e < DV; e++) slot[W * (DK + e)] = vr ? vr[e] : 0.0f;                           \
            }                                                                                                  \
        }                                                                                                      \
    }
"""

_SOURCE = (
    native.PARALLEL_PRELUDE
    + native.AVX2_MATH
    + KERNEL_COMMON
    + r"""
DEFINE_PACK(hstu_pack, 8)

/* The inverse of hstu_pack for gradients: grad_kv -> grad_k and grad_v rows (slots past `keys` dropped). */
void hstu_unpack(int64_t u0, int64_t u1, int threads, int heads, int keys, int keys8, const float *grad_kv, float *grad_k,
                 view_t gks, float *grad_v, view_t gvs) {
    FOR_UNITS(bh) {
        const float *KV = grad_kv + bh * keys8 * C;
        for (int j = 0; j < keys; j++) {
            const float *slot = KV + (int64_t)(j / 8) * 8 * C + j % 8;
            float *kr = (float *)row_of(grad_k, gks, bh, heads, j), *vr = (float *)row_of(grad_v, gvs, bh, heads, j);
            for (int d = 0; d < DK; d++) kr[d] = slot[8 * d];
            for (int e = 0; e < DV; e++) vr[e] = slot[8 * (DK + e)];
        }
    }
}

/* q: [B, H, L, DK] rows; kv packed; mask [B, L, S8] bytes; bias [B, L, S8] or NULL; first/stop [L]: multiples
   of 8 bounding the key slots row i may see in any sequence; out: [B, H, L, DV] rows. Units: batch-head pairs. */
void hstu_forward(int64_t u0, int64_t u1, int threads, int heads, int length, int keys8, const float *q, view_t qs,
                  const float *kv, const uint8_t *mask, const float *bias, const int32_t *first,
                  const int32_t *stop, float scale, float *out, view_t os) {
    FOR_UNITS(bh) {
        int64_t b = bh / heads;
        const float *KV = kv + bh * keys8 * C;
        for (int i = 0; i < length; i++) {
            const uint8_t *M = mask + (b * length + i) * keys8;
            const float *Bi = bias ? bias + (b * length + i) * keys8 : 0;
            const float *Qi = row_of(q, qs, bh, heads, i);
            __m256 qd[DK], acc[DV];
            for (int d = 0; d < DK; d++) qd[d] = _mm256_broadcast_ss(Qi + d);
            for (int e = 0; e < DV; e++) acc[e] = _mm256_setzero_ps();
            for (int j = first[i]; j < stop[i]; j += 8) {
                const float *block = KV + (int64_t)j * C;
                __m256 s = Bi ? _mm256_loadu_ps(Bi + j) : _mm256_setzero_ps();
                for (int d = 0; d < DK; d++) s = _mm256_fmadd_ps(qd[d], _mm256_loadu_ps(block + 8 * d), s);
                __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), s)));
                __m256 w = _mm256_mul_ps(_mm256_div_ps(s, den), mask8(M + j));
                for (int e = 0; e < DV; e++)
                    acc[e] = _mm256_fmadd_ps(w, _mm256_loadu_ps(block + 8 * (DK + e)), acc[e]);
            }
            float *Oi = (float *)row_of(out, os, bh, heads, i);
            for (int e = 0; e < DV; e++) Oi[e] = sum8(acc[e]) * scale;
        }
    }
}

/* grad_out: [B, H, L, DV] rows, multiplied by grad_scale on the fly; grad_q: [B, H, L, DK] rows (written);
   grad_kv (packed) and grad_bias ([B, L, S8] or NULL) zero-initialised. With grad_bias the units are batch
   elements (all heads of a sequence in one call, so each grad_bias row has a single writer), otherwise
   batch-head pairs. */
void hstu_backward(int64_t u0, int64_t u1, int threads, int heads, int length, int keys8, const float *q, view_t qs,
                   const float *kv, const uint8_t *mask, const float *bias, const int32_t *first,
                   const int32_t *stop, const float *grad_out, view_t gos, float grad_scale, float *grad_q,
                   view_t gqs, float *grad_kv, float *grad_bias) {
    int per_unit = grad_bias ? heads : 1;
    const __m256 one = _mm256_set1_ps(1.0f);
    FOR_UNITS(unit) for (int64_t bh = unit * per_unit; bh < (unit + 1) * per_unit; bh++) {
        int64_t b = bh / heads;
        const float *KV = kv + bh * keys8 * C;
        float *GKV = grad_kv + bh * keys8 * C;
        for (int i = 0; i < length; i++) {
            const uint8_t *M = mask + (b * length + i) * keys8;
            const float *Bi = bias ? bias + (b * length + i) * keys8 : 0;
            float *GBi = grad_bias ? grad_bias + (b * length + i) * keys8 : 0;
            const float *Qi = row_of(q, qs, bh, heads, i), *Gi = row_of(grad_out, gos, bh, heads, i);
            __m256 qd[DK], gd[DV], gq[DK];
            for (int d = 0; d < DK; d++) {
                qd[d] = _mm256_broadcast_ss(Qi + d);
                gq[d] = _mm256_setzero_ps();
            }
            for (int e = 0; e < DV; e++) gd[e] = _mm256_set1_ps(Gi[e] * grad_scale);
            for (int j = first[i]; j < stop[i]; j += 8) {
                const float *block = KV + (int64_t)j * C;
                float *grad_block = GKV + (int64_t)j * C;
                __m256 s = Bi ? _mm256_loadu_ps(Bi + j) : _mm256_setzero_ps();
                __m256 gw = _mm256_setzero_ps();
                for (int d = 0; d < DK; d++) s = _mm256_fmadd_ps(qd[d], _mm256_loadu_ps(block + 8 * d), s);
                for (int e = 0; e < DV; e++) gw = _mm256_fmadd_ps(gd[e], _mm256_loadu_ps(block + 8 * (DK + e)), gw);
                __m256 m = mask8(M + j);
                __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), s))));
                __m256 w = _mm256_mul_ps(_mm256_mul_ps(s, sig), m);
                /* d silu(s) / ds = sig * (1 + s * (1 - sig)) */
                __m256 gs = _mm256_mul_ps(_mm256_mul_ps(gw, m),
                                          _mm256_mul_ps(sig, _mm256_fmadd_ps(s, _mm256_sub_ps(one, sig), one)));
                for (int d = 0; d < DK; d++) {
                    float *p = grad_block + 8 * d;
                    _mm256_storeu_ps(p, _mm256_fmadd_ps(gs, qd[d], _mm256_loadu_ps(p)));
                    gq[d] = _mm256_fmadd_ps(gs, _mm256_loadu_ps(block + 8 * d), gq[d]);
                }
                for (int e = 0; e < DV; e++) {
                    float *p = grad_block + 8 * (DK + e);
                    _mm256_storeu_ps(p, _mm256_fmadd_ps(w, gd[e], _mm256_loadu_ps(p)));
                }
                if (GBi) _mm256_storeu_ps(GBi + j, _mm256_add_ps(_mm256_loadu_ps(GBi + j), gs));
            }
            float *GQi = (float *)row_of(grad_q, gqs, bh, heads, i);
            for (int d = 0; d < DK; d++) GQi[d] = sum8(gq[d]);
        }
    }
}
"""
)

_I64, _INT, _PTR, _FLOAT = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float


class View(ctypes.Structure):
    """view_t: element strides of batch, head and row of a [B, H, rows, width] tensor (width contiguous)."""

    _fields_ = [("b", ctypes.c_int64), ("h", ctypes.c_int64), ("row", ctypes.c_int64)]


# Argument groups: (first unit, last unit, threads, heads, rows or keys, padded keys) and the mask-derived
# layout (packed keys/values, mask, bias, first, stop).
_RANGE = [_I64, _I64, _INT, _INT, _INT, _INT]
_LAYOUT = [_PTR, _PTR, _PTR, _PTR, _PTR]
_SIGNATURES = {
    "hstu_pack": [*_RANGE, _PTR, View, _PTR, View, _PTR],
    "hstu_unpack": [*_RANGE, _PTR, _PTR, View, _PTR, View],
    "hstu_forward": [*_RANGE, _PTR, View, *_LAYOUT, _FLOAT, _PTR, View],
    "hstu_backward": [*_RANGE, _PTR, View, *_LAYOUT, _PTR, View, _FLOAT, _PTR, View, _PTR, _PTR],
}


@functools.cache
def _library(dk: int, dv: int) -> ctypes.CDLL | None:
    """The kernel for head widths (dk, dv), built on first use; None (with one warning) if that fails."""
    what = f"the fused HSTU attention kernel for {dk}x{dv} heads"
    return native.load(f"hstu_attention_{dk}x{dv}", _SOURCE, _SIGNATURES, what, (f"DK={dk}", f"DV={dv}"))


def supports(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> bool:
    """Whether the fused kernel can run these inputs (and could be built on this machine)."""
    tensors = (q, k, v) if bias is None else (q, k, v, bias)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    dk, dv = q.shape[-1], v.shape[-1]
    return dk <= MAX_HEAD_DIM and dv <= MAX_HEAD_DIM and _library(dk, dv) is not None


def _mask_layout(mask: Tensor | PassMask, shape: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """mask [B, L, S] bool (or broadcastable to `shape`) -> (mask padded to [B, L, S8], first [L], stop [L]
    int32 key-slot bounds); once per pass for a `PassMask`."""
    keys8 = padded_keys(shape[2])

    def build() -> tuple[Tensor, Tensor, Tensor]:
        tensor = mask_tensor(mask)
        return _build_mask_layout(tensor if tensor.shape == shape else tensor.expand(shape), keys8)

    return derived(mask, ("native layout", shape), build)


def padded_keys(keys: int) -> int:
    """The kernel's row width for `keys` key slots (rounded up to KEY_ALIGN)."""
    return -(-keys // KEY_ALIGN) * KEY_ALIGN


def _padded_bias(bias: Tensor, keys8: int) -> Tensor:
    """bias [B, L, S] as the kernel reads it, a contiguous [B, L, S8]. A bias that is already the first S
    columns of such a tensor (as `persrec.models.hstu` builds it) is used in place, padding included: the
    padded mask hides those columns, so any finite values there leave the results unchanged."""
    batch, length, keys = bias.shape
    if bias.stride() == (length * keys8, keys8, 1):
        needed = (bias.storage_offset() + batch * length * keys8) * bias.element_size()
        if bias.untyped_storage().nbytes() >= needed:
            return bias.as_strided((batch, length, keys8), (length * keys8, keys8, 1))
    return F.pad(bias, (0, keys8 - keys)).contiguous()


def _build_mask_layout(mask: Tensor, keys8: int) -> tuple[Tensor, Tensor, Tensor]:
    if mask.dtype != torch.bool:
        mask = mask != 0  # the kernel reads one byte per entry
    keys = mask.shape[2]
    padded = F.pad(mask, (0, keys8 - keys)).contiguous()
    seen = any_sequence(mask)  # [L, S]: some sequence lets row i see key j
    visible = seen.any(1)
    first = seen.to(torch.uint8).argmax(1)  # first True (argmax returns the first maximum)
    last = keys - 1 - seen.flip(1).to(torch.uint8).argmax(1)
    first = torch.where(visible, first // 8 * 8, 0).to(torch.int32).contiguous()
    stop = torch.where(visible, (last // 8 + 1) * 8, 0).to(torch.int32).contiguous()
    return padded, first, stop


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _readable(t: Tensor) -> Tensor:
    """`t` with a contiguous last dimension (copied only if it has none); other strides are passed along."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: Tensor) -> View:
    """Batch, head and row strides of a [B, H, rows, width] tensor whose last dimension is contiguous."""
    return View(t.stride(0), t.stride(1), t.stride(2))


def _rows_major(batch: int, heads: int, rows: int, width: int, like: Tensor) -> Tensor:
    """An uninitialised [B, H, rows, width] view of [B, rows, H, width] storage: the layout the layers around
    the attention use (heads side by side in each token's features), so they need no transposing copy."""
    return like.new_empty(batch, rows, heads, width).transpose(1, 2)


class _NativeHSTUAttention(torch.autograd.Function):
    """Same contract as `hstu_attention_reference`; float32 CPU tensors only (see `supports`). Inputs are read
    and outputs written in place through their strides; keys and values are packed into key blocks once."""

    @staticmethod
    def forward(ctx, q, k, v, layout, bias, normaliser):  # noqa: D102
        from persrec.models import hstu_native512

        batch, heads, length, dk = q.shape
        keys, dv = k.shape[2], v.shape[3]
        keys8 = padded_keys(keys)
        # Without gradients the AVX-512 forward may run: it packs its own 16-key blocks, which no backward reads.
        wide = None if any(ctx.needs_input_grad) else hstu_native512.library(dk, dv)
        library, block = (wide, hstu_native512.BLOCK) if wide is not None else (_library(dk, dv), KEY_ALIGN)
        slots = -(-keys8 // block) * block
        mask8, first, stop = layout
        q, k, v = _readable(q), _readable(k), _readable(v)
        kv = q.new_empty(batch * heads, slots // block, dk + dv, block)
        pack = (_ptr(k), _strides(k), _ptr(v), _strides(v), _ptr(kv))
        names = ("hstu_pack16", "hstu_forward16") if wide is not None else ("hstu_pack", "hstu_forward")
        pack_name, forward_name = names
        native.run_parallel(library, pack_name, batch * heads, heads, keys, slots, *pack)
        bias8 = None if bias is None else _padded_bias(bias, keys8)
        out = _rows_major(batch, heads, length, dv, q)
        layout = (_ptr(kv), _ptr(mask8), _ptr(bias8), _ptr(first), _ptr(stop))
        io = (1.0 / normaliser, _ptr(out), _strides(out))
        native.run_parallel(
            library, forward_name, batch * heads, heads, length, keys8, _ptr(q), _strides(q), *layout, *io
        )
        if wide is not None:
            return out  # nothing needs a gradient: no backward will run
        ctx.save_for_backward(q, kv, bias8, mask8, first, stop)
        ctx.normaliser, ctx.shape = normaliser, (batch, heads, length, keys, dk, dv)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, kv, bias8, mask8, first, stop = ctx.saved_tensors
        batch, heads, length, keys, dk, dv = ctx.shape
        keys8 = mask8.shape[2]
        library = _library(dk, dv)
        grad_out = _readable(grad_out)
        grad_q = _rows_major(batch, heads, length, dk, q)
        grad_kv = torch.zeros_like(kv)
        need_bias = bias8 is not None and ctx.needs_input_grad[4]
        grad_bias8 = torch.zeros_like(bias8) if need_bias else None
        layout = (_ptr(kv), _ptr(mask8), _ptr(bias8), _ptr(first), _ptr(stop))
        grads = (_ptr(grad_out), _strides(grad_out), 1.0 / ctx.normaliser, _ptr(grad_q), _strides(grad_q))
        grads += (_ptr(grad_kv), _ptr(grad_bias8))
        units = batch if need_bias else batch * heads
        native.run_parallel(
            library, "hstu_backward", units, heads, length, keys8, _ptr(q), _strides(q), *layout, *grads
        )
        grad_k, grad_v = _rows_major(batch, heads, keys, dk, q), _rows_major(batch, heads, keys, dv, q)
        unpack = (_ptr(grad_kv), _ptr(grad_k), _strides(grad_k), _ptr(grad_v), _strides(grad_v))
        native.run_parallel(library, "hstu_unpack", batch * heads, heads, keys, keys8, *unpack)
        grad_bias = None if grad_bias8 is None else grad_bias8[:, :, :keys]
        return grad_q, grad_k, grad_v, None, grad_bias, None


def native_hstu_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | PassMask, bias: Tensor | None, normaliser: float
) -> Tensor:
    """The fused kernel; call only where `supports(q, k, v, bias)` is True. mask: [B, L, S] bool or broadcastable
    to it, bare or as the pass's `PassMask` (whose padded copy and key bounds are then built once per pass)."""
    layout = _mask_layout(mask, (q.shape[0], q.shape[2], k.shape[2]))
    return _NativeHSTUAttention.apply(q, k, v, layout, bias, normaliser)

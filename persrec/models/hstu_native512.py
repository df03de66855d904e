"""The fused HSTU attention's forward pass with AVX-512: 16 keys per instruction instead of 8, for inference.

Why: the forward of `hstu_native` is bound by the number of vector instructions per score (a product, an
exponential, a division and a weighted sum for every eight keys), so on CPUs with AVX-512 twice as many keys
per instruction made it 1.33x faster. Only the forward: a pass that needs gradients keeps the 8-key layout that
the backward kernel reads, so this build runs when no input needs a gradient (serving, evaluation). Optional
like every kernel: CPUs without AVX-512 (or PERSREC_NATIVE_AVX512=0) use the AVX2 forward, which gives the
same values up to float rounding (the 16-lane sums are added in another order).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from persrec import native
from persrec.models import hstu_native

# Set to 0 to keep the AVX2 forward on AVX-512 machines.
ENV_SWITCH = "PERSREC_NATIVE_AVX512"
FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
BLOCK = 16

_SOURCE = (
    native.PARALLEL_PRELUDE
    + hstu_native.KERNEL_COMMON
    + r"""
#include <immintrin.h>

/* exp(x) to about 1.3 ulp on [-87, 88], as exp8 of the AVX2 build: x = n ln2 + r, a degree-7 polynomial for
   exp(r) and 2^n assembled in the exponent bits. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

DEFINE_PACK(hstu_pack16, 16)

/* As hstu_forward of the AVX2 build, over kv packed in blocks of 16 (hstu_pack16, [BH, S16 / 16, C, 16]).
   mask / bias rows are S8 wide (the AVX2 layout): a block reaching past S8 reads only its first S8 - j lanes.
   first / stop are multiples of 8; a block starts at first rounded down to 16 (keys the mask hides). */
void hstu_forward16(int64_t u0, int64_t u1, int threads, int heads, int length, int keys8, const float *q, view_t qs,
                    const float *kv, const uint8_t *mask, const float *bias, const int32_t *first,
                    const int32_t *stop, float scale, float *out, view_t os) {
    int64_t keys16 = (keys8 + 15) / 16 * 16;
    FOR_UNITS(bh) {
        int64_t b = bh / heads;
        const float *KV = kv + bh * keys16 * C;
        for (int i = 0; i < length; i++) {
            const uint8_t *M = mask + (b * length + i) * keys8;
            const float *Bi = bias ? bias + (b * length + i) * keys8 : 0;
            const float *Qi = row_of(q, qs, bh, heads, i);
            __m512 qd[DK], acc[DV];
            for (int d = 0; d < DK; d++) qd[d] = _mm512_set1_ps(Qi[d]);
            for (int e = 0; e < DV; e++) acc[e] = _mm512_setzero_ps();
            for (int j = first[i] / 16 * 16; j < stop[i]; j += 16) {
                __mmask16 live = keys8 - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (keys8 - j)) - 1);
                const float *block = KV + (int64_t)j * C;
                __m512 s = Bi ? _mm512_maskz_loadu_ps(live, Bi + j) : _mm512_setzero_ps();
                for (int d = 0; d < DK; d++) s = _mm512_fmadd_ps(qd[d], _mm512_loadu_ps(block + 16 * d), s);
                __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), s)));
                __m512 keep = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, M + j)));
                __m512 w = _mm512_mul_ps(_mm512_div_ps(s, den), keep);
                for (int e = 0; e < DV; e++)
                    acc[e] = _mm512_fmadd_ps(w, _mm512_loadu_ps(block + 16 * (DK + e)), acc[e]);
            }
            float *Oi = (float *)row_of(out, os, bh, heads, i);
            for (int e = 0; e < DV; e++) Oi[e] = _mm512_reduce_add_ps(acc[e]) * scale;
        }
    }
}
"""
)

_I64, _INT, _PTR, _FLOAT = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
_VIEW = hstu_native.View
_SIGNATURES = {
    "hstu_pack16": [_I64, _I64, _INT, _INT, _INT, _INT, _PTR, _VIEW, _PTR, _VIEW, _PTR],
    "hstu_forward16": [
        *(_I64, _I64, _INT, _INT, _INT, _INT, _PTR, _VIEW),
        *(_PTR, _PTR, _PTR, _PTR, _PTR, _FLOAT, _PTR, _VIEW),
    ],
}


def cpu_has_avx512() -> bool:
    """AVX-512 F/BW/VL/DQ, what torch's own AVX512 kernels need (and this build uses)."""
    return native.cpu_has_avx2() and torch.backends.cpu.get_cpu_capability() == "AVX512"


@functools.cache
def _library(dk: int, dv: int) -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0" or not cpu_has_avx512():
        return None
    what = f"the AVX-512 HSTU attention forward for {dk}x{dv} heads"
    defines = (f"DK={dk}", f"DV={dv}")
    return native.load(f"hstu_attention512_{dk}x{dv}", _SOURCE, _SIGNATURES, what, defines, FLAGS)


def library(dk: int, dv: int) -> ctypes.CDLL | None:
    """The AVX-512 forward for these head widths, or None where it is off or unavailable (read per call, so
    ENV_SWITCH can be changed at run time)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    return _library(dk, dv)

"""The element-wise part of a tiled HSTU score tile, `SiLU(scores + bias) * mask`, in one pass of C.

Why: for heads too wide for the fused kernel (`hstu_native`, up to 32) the tiled path's two GEMMs run well in
BLAS, but between them each score tile went through a gather of the bias, an addition, a SiLU and a mask
multiplication, four passes and a gathered copy of the bias: about as long as the GEMMs at the ML-1M settings
(heads of 50). Here each score is read and written once. Optional like every kernel (`persrec.native`): where
it is unavailable, `hstu_attention` keeps the PyTorch ops, which give the same values up to float rounding
(SiLU's exponential here is accurate to about 1.3 ulp).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from persrec import native

_SOURCE = (
    native.PARALLEL_PRELUDE
    + native.AVX2_MATH
    + r"""
#include <string.h>

/* Eight scores: + bias (gathered from `table` by `index`, or read from `bias`), SiLU, times the mask. */
static inline __m256 epilogue8(__m256 s, const float *table, const int32_t *index, const float *bias,
                               const uint8_t *mask) {
    if (index) s = _mm256_add_ps(s, _mm256_i32gather_ps(table, _mm256_loadu_si256((const __m256i *)index), 4));
    else if (bias) s = _mm256_add_ps(s, _mm256_loadu_ps(bias));
    __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), s)));
    s = _mm256_div_ps(s, den);
    return mask ? _mm256_mul_ps(s, mask8(mask)) : s;
}

/* scores: [G * H * rows, cols] contiguous, rows u = (g * H + h) * rows + r. index/bias/mask point at the
   tile's first entry of [G or 1, rows, cols] layouts with element strides (per batch element, per row); NULL:
   no such term. The last partial block of a row goes through a zero-padded copy, so every score takes the
   same arithmetic. */
void score_epilogue(int64_t u0, int64_t u1, int threads, int heads, int rows, int cols, float *scores,
                    const float *table, const int32_t *index, int64_t igs, int64_t irs, const float *bias,
                    int64_t bgs, int64_t brs, const uint8_t *mask, int64_t mgs, int64_t mrs) {
    FOR_UNITS(u) {
        int64_t g = u / rows / heads, r = u % rows;
        float *S = scores + u * cols;
        const int32_t *I = index ? index + g * igs + r * irs : 0;
        const float *B = bias ? bias + g * bgs + r * brs : 0;
        const uint8_t *M = mask ? mask + g * mgs + r * mrs : 0;
        int c = 0;
        for (; c + 8 <= cols; c += 8)
            _mm256_storeu_ps(S + c, epilogue8(_mm256_loadu_ps(S + c), table, I ? I + c : 0, B ? B + c : 0,
                                              M ? M + c : 0));
        if (c < cols) {
            int n = cols - c;
            float s8[8] = {0}, b8[8] = {0};
            int32_t i8[8] = {0};
            uint8_t m8[8] = {0};
            memcpy(s8, S + c, n * sizeof(float));
            if (I) memcpy(i8, I + c, n * sizeof(int32_t));
            if (B) memcpy(b8, B + c, n * sizeof(float));
            if (M) memcpy(m8, M + c, n);
            _mm256_storeu_ps(s8, epilogue8(_mm256_loadu_ps(s8), table, I ? i8 : 0, B ? b8 : 0, M ? m8 : 0));
            memcpy(S + c, s8, n * sizeof(float));
        }
    }
}
"""
)

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "score_epilogue": [
        *(_I64, _I64, _INT, _INT, _INT, _INT, _PTR),
        *(_PTR, _PTR, _I64, _I64),
        *(_PTR, _I64, _I64),
        *(_PTR, _I64, _I64),
    ]
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    return native.load("hstu_score_epilogue", _SOURCE, _SIGNATURES, "the HSTU score-tile kernel")


def available(scores: Tensor) -> bool:
    """Whether `apply` can run on this tile (float32 on a CPU whose kernel could be built)."""
    return scores.device.type == "cpu" and scores.dtype == torch.float32 and _library() is not None


def _tile_strides(t: Tensor) -> tuple[int, int, int]:
    """Pointer and (batch, row) element strides of a [G or 1, rows, cols] tile view with unit column stride."""
    assert t.stride(2) == 1 or t.shape[2] == 1, "tile views need contiguous columns"
    return t.data_ptr(), (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)


def apply(
    scores: Tensor,
    heads: int,
    table: Tensor | None = None,
    index: Tensor | None = None,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
) -> None:
    """scores [G * H, rows, cols] (contiguous) <- SiLU(scores + bias) * mask, in place.

    The bias is `table[index]` (index: int32 [G or 1, rows, cols]) or `bias` (float32, same shape), or absent;
    mask: bool [G or 1, rows, cols] or None (every entry visible). Call only where `available(scores)`.
    """
    library = _library()
    assert library is not None and scores.is_contiguous(), "score_epilogue needs the kernel and a dense tile"
    units, rows, cols = scores.shape
    gathered = (
        (table.data_ptr(), *_tile_strides(index))
        if index is not None and table is not None
        else (None, None, 0, 0)
    )
    dense = _tile_strides(bias) if bias is not None else (None, 0, 0)
    masked = _tile_strides(mask) if mask is not None else (None, 0, 0)
    native.run_parallel(
        library,
        "score_epilogue",
        units * rows,
        heads,
        rows,
        cols,
        scores.data_ptr(),
        *gathered,
        *dense,
        *masked,
    )

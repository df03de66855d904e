"""Small C kernels compiled on first use and loaded with ctypes: the build, its cache and the thread split.

Why C at all: a few HSTU operations are many cheap steps per score (a SiLU, a mask, a bias, a log-bucket of a
time gap), and built from PyTorch ops each step is a round trip through memory. Everything here is optional:
without a C compiler, on a CPU without AVX2/FMA or with PERSREC_NATIVE_KERNELS=0, `load` returns None and the
callers keep their PyTorch paths, which give the same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# Set to 0 to never build or use a kernel.
ENV_SWITCH = "PERSREC_NATIVE_KERNELS"
FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")
# Tried first; without it (a compiler lacking OpenMP) a kernel is built single-threaded per call.
OPENMP_FLAG = "-fopenmp"

# The loop every kernel's entry points share: units (rows, batch-head pairs, ...) [u0, u1) are shared out over
# `threads` OpenMP threads, the pool PyTorch's CPU ops use, so no extra threads compete for the cores. Built
# without OpenMP, `run_parallel` splits the range over Python threads instead.
PARALLEL_PRELUDE = r"""
#include <stdint.h>
#ifdef _OPENMP
#define FOR_UNITS(u) _Pragma("omp parallel for schedule(static) num_threads(threads)") for (int64_t u = u0; u < u1; u++)
#else
#define FOR_UNITS(u) for (int64_t u = u0; u < u1; u++)
#endif
"""

# Vector helpers for kernels that use AVX2/FMA (eight floats at a time).
AVX2_MATH = r"""
#include <immintrin.h>

/* exp(x) to about 1.3 ulp on [-87, 88]: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial for
   exp(r) and 2^n assembled in the exponent bits. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723212e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* Eight mask bytes (0 or 1) as floats. */
static inline __m256 mask8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline float sum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
"""


def cache_dir() -> Path:
    """Where compiled kernels are kept: $PERSREC_CACHE_DIR/kernels (default ~/.cache/persrec/kernels)."""
    root = os.environ.get("PERSREC_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "persrec") / "kernels"


def cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compile(command: list[str], source: str, target: Path) -> None:
    """Build `source` into `target` atomically (concurrent processes may race to build the same file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source_file = Path(work) / f"{target.stem}.c"
        source_file.write_text(source)
        built = Path(work) / target.name
        subprocess.run(
            [*command, str(source_file), "-o", str(built)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(built, target)


def _build(compiler: str, flags: list[str], stem: str, source: str, what: str, announce: bool) -> ctypes.CDLL:
    """The compiled library for these flags, from the cache or built now (saying so once, since a first step
    that pauses for seconds would otherwise look like a hang)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256("\0".join([source, *flags, version]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{stem}_{digest}.so"
    if not target.exists():
        if announce:
            print(
                f"persrec: compiling {what}, once (cached in {target.parent}; {ENV_SWITCH}=0 turns it off)",
                file=sys.stderr,
                flush=True,
            )
        _compile([compiler, *flags], source, target)
    return ctypes.CDLL(str(target))


def load(
    stem: str,
    source: str,
    signatures: dict[str, list[type]],
    what: str,
    defines: tuple[str, ...] = (),
    extra_flags: tuple[str, ...] = (),
) -> ctypes.CDLL | None:
    """The library built from `source` (with `-D` `defines` and `extra_flags`, e.g. an instruction set), its
    functions typed per `signatures`; None where kernels are off or unsupported, and None with one warning
    naming `what` when the build fails. The library's `openmp` attribute says whether it shares work out
    itself (see `run_parallel`)."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or not cpu_has_avx2():
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    flags = [*FLAGS, *extra_flags, *(f"-D{define}" for define in defines)]
    try:
        try:
            library = _build(compiler, [*flags, OPENMP_FLAG], stem, source, what, announce=True)
            library.openmp = True
        except subprocess.CalledProcessError:
            library = _build(compiler, flags, stem, source, what, announce=False)
            library.openmp = False
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"could not build {what} ({detail.strip()[:500]}); using the PyTorch path",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, None
    return library


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def run_parallel(library: ctypes.CDLL, name: str, units: int, *args: object) -> None:
    """Run kernel `name(u0, u1, threads, *args)` over units [0, units) on torch's thread count: inside the
    kernel with OpenMP (PyTorch's own pool), or, for a build without OpenMP, as one contiguous range per Python
    thread (ctypes releases the GIL during the call)."""
    global _pool, _pool_size
    function = getattr(library, name)
    threads = max(1, min(torch.get_num_threads(), units))
    if library.openmp or threads == 1:
        function(0, units, threads, *args)
        return
    bounds = [units * t // threads for t in range(threads + 1)]
    with _pool_lock:
        if _pool is None or _pool_size < threads - 1:
            _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="persrec-kernel")
            _pool_size = threads - 1
        pool = _pool
    futures = [pool.submit(function, bounds[t], bounds[t + 1], 1, *args) for t in range(1, threads)]
    function(bounds[0], bounds[1], 1, *args)
    for future in futures:
        future.result()

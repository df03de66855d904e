"""Clocks for speed measurements: device sync, one timed call, and this machine's fp32 matmul peak.

Benchmarks report speed as ratios against references measured in the same run (a matmul peak, a baseline path),
so every measurement goes through the same two clocks: wall time, and on a CPU the process's CPU time, which
other processes' load does not inflate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a wall clock read afterwards covers it (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """Wall seconds of one call, and the process's CPU seconds (None on CUDA, where they mean nothing)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    cpu_s = time.process_time() - cpu if device.type == "cpu" else None
    return time.perf_counter() - wall, cpu_s


def medians(samples: list[tuple[float, float | None]]) -> tuple[float, float | None]:
    """Median wall and CPU seconds of several `timed_call` results."""
    wall = statistics.median(w for w, _ in samples)
    cpu = None if samples[0][1] is None else statistics.median(c for _, c in samples)
    return wall, cpu


def matmul_rate(device: torch.device, size: int, runs: int = 5) -> tuple[float, float | None]:
    """fp32 FLOP/s of a square `size` torch.mm (median of `runs` after one warm-up): (wall, CPU clock or None)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    wall, cpu = medians([timed_call(lambda: torch.mm(a, b), device) for _ in range(runs)])
    flops = 2 * size**3
    return flops / wall, None if cpu is None else flops / cpu


def format_figure(value: float | None) -> str:
    """A measured figure for a benchmark table: three significant digits or so, "-" when not measured."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"

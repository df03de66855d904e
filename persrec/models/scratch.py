"""Per-thread scratch buffers that inference passes reuse instead of allocating afresh.

Why: glibc hands large blocks back to the kernel when they are freed, so a multi-MiB tensor allocated in every
pass is page-faulted in again in every pass: about 1 ms per 5 MiB here, a fifth of an ML-1M inference pass of
HSTU (the per-pass relative-bias index and each layer's input projection are 20 MiB each at batch 128).

A slot is only reused while no gradient is recorded (autograd may keep a tensor alive past the pass) and on
CPU, and each thread has its own slots, so concurrent passes (a server's worker threads) never share one. The
caller promises that nothing it got from a slot outlives the pass that asked for it. Slots larger than
`MAX_SLOT_BYTES` are not kept, which bounds what an idle thread holds.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

MAX_SLOT_BYTES = 64 * 1024 * 1024

_local = threading.local()


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor of `shape`: a view of this thread's `slot` buffer where one may be reused."""
    count = 1
    for size in shape:
        count *= size
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if torch.is_grad_enabled() or device.type != "cpu" or nbytes > MAX_SLOT_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    # Tensors made under inference mode may not be written outside it: one set of slots per mode.
    key = (slot, dtype, torch.is_inference_mode_enabled())
    slots: dict[tuple[str, torch.dtype, bool], Tensor] = _local.__dict__.setdefault("slots", {})
    buffer = slots.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = slots[key] = torch.empty(count, dtype=dtype)
    return buffer[:count].view(shape)


def release() -> None:
    """Drop this thread's buffers (e.g. after a large evaluation, before a long idle period)."""
    _local.__dict__.pop("slots", None)

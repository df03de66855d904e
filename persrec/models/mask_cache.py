"""A one-entry cache for values derived from an attention mask.

Every layer of a forward pass receives the same mask object, and the attention kernels summarise it on the host
(which key blocks each query block may see). Caching that summary per mask object turns one summary per layer
into one per pass, without changing any signature between the model and the kernels.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

T = TypeVar("T")


class MaskCache:
    """Remembers one value computed from a mask while the same, unmodified mask object comes back."""

    def __init__(self) -> None:
        self._entry: tuple[weakref.ref, int, object, object] | None = None

    def get(self, mask: Tensor, key: object, build: Callable[[], T]) -> T:
        """The cached value for (mask, key), or `build()` (remembered) when the mask or key changed.

        A mask modified in place is noticed through its version counter; inference tensors have none, so for
        them the value is always rebuilt.
        """
        if mask.is_inference():
            return build()
        entry = self._entry
        if entry is not None and entry[0]() is mask and entry[1] == mask._version and entry[2] == key:
            return entry[3]  # type: ignore[return-value]
        value = build()
        self._entry = (weakref.ref(mask), mask._version, key, value)
        return value

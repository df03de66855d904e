"""The differences between transformers versions that the expert cache touches, in one place.

- 5.24 renamed the forward argument (and output field) `past_key_values` to `cache`; earlier versions only know
  `past_key_values`. The model's own signature says which it takes.
- A cache is built from stored per-layer (keys, values): `DynamicCache(ddp_cache_data=...)` on 5.x,
  `DynamicCache.from_legacy_cache` on 4.x. A cache object is mutated by the forward that reads it, so a fresh one
  is built for every call.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

from torch import Tensor


@cache
def _cache_argument_of(forward_type: type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model: Any) -> str:
    """The name under which `model.forward` takes a key/value cache."""
    return _cache_argument_of(type(model))


def build_cache(pairs: list[tuple[Tensor, Tensor]]) -> Any:
    """A fresh `DynamicCache` holding the given per-layer (keys [B, H, C, d], values [B, H, C, d])."""
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(tuple(pairs))
    return DynamicCache(ddp_cache_data=pairs)


def output_cache(output: Any) -> Any:
    """The cache a forward with `use_cache=True` returned."""
    cache = getattr(output, "cache", None) if "cache" in output else None
    return cache if cache is not None else output["past_key_values"]


def cache_tensors(cache: Any) -> list[tuple[Tensor, Tensor]]:
    """Per-layer (keys, values) of a cache, [B, H, T, d] each."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))

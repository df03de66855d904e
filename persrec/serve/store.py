"""Where a server keeps each user's history and expert cache between requests (and across restarts).

A store holds, per user: the interaction history (original item ids, optional timestamps; append-only) and
at most one expert cache with its bookkeeping: the model fingerprint that made it and how many of the
user's items lie before the cut it summarises (`covered`). `get_cache` returns a cache only for the
fingerprint asked for: a cache made by another model (other weights or config) is never used.

Caches are `KVCache` objects, whatever the backbone; they are stored as safetensors bytes (nothing in them
can run code when read back), keys and values optionally in float16 or bfloat16 (half the bytes).

Backends: `SQLiteStore` (the embedded default, `sqlite:///path/to/file.db` or a plain path) and `RedisStore`
(`redis://host:port/db`, shared by several replicas); `open_store(url)` picks by the URL.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from persrec.config import ConfigError
from persrec.models.base import KVCache

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class UserHistory:
    items: list[Any]
    timestamps: list[int] | None  # None unless every interaction has one

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class StoredCache:
    fingerprint: str
    covered: int  # the cut: items of the history before the part the recent window holds
    cache: KVCache


def user_key(user: Any) -> str:
    """The stored key of a user id: its text, so that `GET /users/5/history` finds the user 5 that JSON
    events created (the user 5 and the user "5" are one user)."""
    return str(user)


def encode_cache(cache: KVCache, dtype: str = "float32") -> bytes:
    """safetensors bytes of a cache; keys and values cast to `dtype` (float32, float16 or bfloat16).

    Layers of one shape are stacked into one tensor each for keys and values: a few tensors instead of two
    per layer keep encoding and decoding cheap (they run on every cache miss and hit).
    """
    cast = CACHE_DTYPES[dtype]
    tensors = {"positions": cache.positions.to(torch.int32), "valid": cache.valid.to(torch.uint8)}
    if cache.timestamps is not None:
        tensors["timestamps"] = cache.timestamps.to(torch.int64)
    for kind, layers in (("keys", cache.keys), ("values", cache.values)):
        if len({tuple(t.shape) for t in layers}) == 1:
            tensors[kind] = torch.stack(layers).to(cast)
        else:  # layers of different widths: one tensor each
            tensors |= {f"{kind}.{i}": t.to(cast) for i, t in enumerate(layers)}
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    return save_tensors(tensors, metadata={"layers": str(len(cache.keys)), "dtype": dtype})


def decode_cache(data: bytes, device: torch.device | str = "cpu") -> KVCache:
    tensors = load_tensors(data)
    layers = int(safe_metadata(data)["layers"])

    def unpack(kind: str) -> list[Tensor]:
        if kind in tensors:
            return list(tensors[kind].to(device, torch.float32).unbind(0))
        return [tensors[f"{kind}.{i}"].to(device, torch.float32) for i in range(layers)]

    keys, values = unpack("keys"), unpack("values")
    return KVCache(
        keys=keys,
        values=values,
        positions=tensors["positions"].to(device, torch.int64),
        timestamps=tensors["timestamps"].to(device) if "timestamps" in tensors else None,
        valid=tensors["valid"].to(device, torch.bool),
    )


def safe_metadata(data: bytes) -> dict[str, str]:
    """The metadata of safetensors bytes (an 8-byte little-endian header length, then a JSON header)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {})


def history_from_lists(items: list[Any], times: list[int | None]) -> UserHistory:
    complete = bool(times) and len(times) == len(items) and all(t is not None for t in times)
    return UserHistory(items, [int(t) for t in times] if complete else None)


class ExpertCacheStore(ABC):
    """Histories and expert caches by user id; see the module docstring."""

    def __init__(self, cache_dtype: str = "float32", device: torch.device | str = "cpu") -> None:
        if cache_dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"--cache_dtype: expected one of {', '.join(CACHE_DTYPES)}, got {cache_dtype!r}"
            )
        self.cache_dtype = cache_dtype
        self.device = device

    # ---- histories -----------------------------------------------------------------------------------------
    @abstractmethod
    def history(self, user: Any) -> UserHistory | None:
        """The user's interactions, oldest first; None for a user the store has never seen."""

    @abstractmethod
    def append(self, user: Any, items: Sequence[Any], timestamps: Sequence[int] | None = None) -> int:
        """Append interactions atomically (all or none); returns the history's new length."""

    # ---- caches --------------------------------------------------------------------------------------------
    @abstractmethod
    def _get_cache(self, key: str) -> tuple[str, int, bytes] | None: ...

    @abstractmethod
    def _put_cache(self, key: str, fingerprint: str, covered: int, data: bytes) -> None: ...

    def get_cache(self, user: Any, fingerprint: str) -> StoredCache | None:
        """The user's cache if `fingerprint` made it; another model's cache is never returned."""
        found = self._get_cache(user_key(user))
        if found is None or found[0] != fingerprint:
            return None
        return StoredCache(found[0], found[1], decode_cache(found[2], self.device))

    def put_cache(self, user: Any, fingerprint: str, covered: int, cache: KVCache) -> None:
        self._put_cache(user_key(user), fingerprint, covered, encode_cache(cache, self.cache_dtype))

    @abstractmethod
    def delete(self, user: Any) -> bool:
        """Forget the user's history and cache; False when there was nothing."""

    def close(self) -> None:  # noqa: B027 (a no-op for backends without connections)
        """Release connections."""


def open_store(
    url: str | None, cache_dtype: str = "float32", default_path: Path | None = None
) -> ExpertCacheStore:
    """`sqlite:///file.db`, a plain file path, `redis://host:port/db`, or None (SQLite at `default_path`)."""
    if url is None:
        if default_path is None:
            raise ConfigError("--store: expected sqlite:///path/to/store.db or redis://host:port/db")
        url = str(default_path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from persrec.serve.store_redis import RedisStore

        return RedisStore(url, cache_dtype)
    from persrec.serve.store_sqlite import SQLiteStore

    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if "://" in path:
        raise ConfigError(f"--store {url}: expected sqlite:///path/to/store.db or redis://host:port/db")
    return SQLiteStore(Path(path), cache_dtype)

"""The shared store: Redis (or Valkey) for several server replicas (`pip install persrec[redis]`).

Per user: two lists (items and timestamps, one JSON value per interaction, appended together in one
MULTI/EXEC transaction, so readers see all of an append or none of it) and a hash with the cache (fingerprint,
covered, safetensors bytes). Keys live under a prefix (`persrec:` by default) and nothing outside it is
touched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlparse

from persrec.config import ConfigError
from persrec.serve.store import ExpertCacheStore, UserHistory, history_from_lists, user_key


class RedisStore(ExpertCacheStore):
    def __init__(self, url: str, cache_dtype: str = "float32", prefix: str | None = None) -> None:
        super().__init__(cache_dtype)
        try:
            import redis
        except ImportError as error:
            raise ConfigError(
                f"--store {url}: the Redis store needs the redis client: pip install 'persrec[redis]'"
            ) from error
        query = parse_qs(urlparse(url).query)
        self.prefix = prefix or query.pop("prefix", ["persrec"])[0]
        clean = url.split("?", 1)[0]
        try:
            self._redis = redis.Redis.from_url(clean, socket_timeout=10)
            self._redis.ping()
        except (redis.RedisError, ValueError) as error:
            raise ConfigError(f"--store {url}: cannot reach Redis ({error})") from error

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}:{kind}:{key}"

    def history(self, user: Any) -> UserHistory | None:
        key = user_key(user)
        pipe = self._redis.pipeline(transaction=True)
        pipe.lrange(self._key("items", key), 0, -1)
        pipe.lrange(self._key("times", key), 0, -1)
        items, times = pipe.execute()
        if not items:
            return None
        return history_from_lists([json.loads(v) for v in items], [json.loads(v) for v in times])

    def append(self, user: Any, items: Sequence[Any], timestamps: Sequence[int] | None = None) -> int:
        key = user_key(user)
        times = list(timestamps) if timestamps is not None else [None] * len(items)
        pipe = self._redis.pipeline(transaction=True)
        pipe.rpush(self._key("items", key), *[json.dumps(item) for item in items])
        pipe.rpush(self._key("times", key), *[json.dumps(t) for t in times])
        length, _ = pipe.execute()
        return int(length)

    def _get_cache(self, key: str) -> tuple[str, int, bytes] | None:
        found = self._redis.hmget(self._key("cache", key), ["fingerprint", "covered", "data"])
        if found[0] is None:
            return None
        return found[0].decode(), int(found[1]), bytes(found[2])

    def _put_cache(self, key: str, fingerprint: str, covered: int, data: bytes) -> None:
        self._redis.hset(
            self._key("cache", key), mapping={"fingerprint": fingerprint, "covered": covered, "data": data}
        )

    def delete(self, user: Any) -> bool:
        key = user_key(user)
        kinds = ("items", "times", "cache")
        return bool(self._redis.delete(*[self._key(kind, key) for kind in kinds]))

    def close(self) -> None:
        self._redis.close()

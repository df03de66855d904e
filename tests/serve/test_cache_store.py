"""Expert-cache stores: round trips, compact dtypes, the fingerprint guard, persistence, both backends."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import torch

from persrec.config import ConfigError
from persrec.models.base import KVCache
from persrec.serve.store import decode_cache, encode_cache, open_store


def _cache(seed: int = 0, timestamps: bool = True, head_dim: int = 4) -> KVCache:
    gen = torch.Generator().manual_seed(seed)
    return KVCache(
        keys=[torch.randn(1, 2, 3, head_dim, generator=gen) for _ in range(2)],
        values=[torch.randn(1, 2, 3, head_dim, generator=gen) for _ in range(2)],
        positions=torch.tensor([[8, 9, 10]]),
        timestamps=torch.tensor([[1_700_000_000, 1_700_000_000, 1_700_000_500]]) if timestamps else None,
        valid=torch.tensor([[True, True, False]]),
    )


def _assert_same(a: KVCache, b: KVCache, atol: float = 0.0) -> None:
    for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.valid, b.valid)
    assert (a.timestamps is None) == (b.timestamps is None)
    if a.timestamps is not None:
        assert torch.equal(a.timestamps, b.timestamps)


@pytest.mark.parametrize("timestamps", [True, False])
def test_codec_round_trip_is_exact_in_float32(timestamps):
    cache = _cache(timestamps=timestamps)
    _assert_same(decode_cache(encode_cache(cache)), cache)


def test_half_precision_halves_the_bytes_within_its_rounding():
    cache = _cache(head_dim=64)
    full, half, brain = (len(encode_cache(cache, d)) for d in ("float32", "float16", "bfloat16"))
    assert half < 0.6 * full and brain == half
    _assert_same(decode_cache(encode_cache(cache, "float16")), cache, atol=4e-3)
    _assert_same(decode_cache(encode_cache(cache, "bfloat16")), cache, atol=3e-2)


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    url = request.getfixturevalue("redis_url")
    import redis

    redis.Redis.from_url(url).flushdb()
    return url


def test_histories_append_and_delete(store_url):
    store = open_store(store_url)
    assert store.history("u1") is None
    assert store.append("u1", ["a", 7], [10, 20]) == 2
    assert store.append("u1", ["b"], [30]) == 3
    got = store.history("u1")
    assert got.items == ["a", 7, "b"] and got.timestamps == [10, 20, 30]
    store.append(5, ["x"])  # no timestamps: the history has none
    assert store.history("5").timestamps is None and store.history(5).items == ["x"]
    store.put_cache("u1", "model-a", 2, _cache())
    assert store.delete("u1") and store.history("u1") is None and store.get_cache("u1", "model-a") is None
    assert not store.delete("u1")
    store.close()


def test_a_cache_of_another_model_is_never_returned(store_url):
    store = open_store(store_url, cache_dtype="float16")
    store.put_cache("u1", "model-a", 12, _cache())
    found = store.get_cache("u1", "model-a")
    assert found.covered == 12 and found.fingerprint == "model-a"
    _assert_same(found.cache, _cache(), atol=2e-3)
    assert store.get_cache("u1", "model-b") is None
    store.put_cache("u1", "model-b", 13, _cache(1))
    assert store.get_cache("u1", "model-a") is None and store.get_cache("u1", "model-b").covered == 13
    store.close()


def test_concurrent_appends_lose_nothing(store_url):
    stores = [open_store(store_url) for _ in range(4)]  # separate connections, as separate processes have

    def writer(index: int) -> None:
        for step in range(25):
            stores[index].append("shared", [f"{index}-{step}"])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    items = stores[0].history("shared").items
    assert sorted(items) == sorted(f"{i}-{s}" for i in range(4) for s in range(25))
    for store in stores:
        store.close()


def test_sqlite_survives_a_restart_and_refuses_foreign_files(tmp_path):
    path = tmp_path / "store.db"
    store = open_store(str(path))
    store.append("u1", ["a"])
    store.put_cache("u1", "m", 0, _cache())
    store.close()
    reopened = open_store(f"sqlite:///{path}")
    assert reopened.history("u1").items == ["a"]
    _assert_same(reopened.get_cache("u1", "m").cache, _cache())
    assert reopened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.close()
    foreign = tmp_path / "theirs.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE accounts (id INTEGER)")
    before = foreign.read_bytes()
    with pytest.raises(ConfigError, match="is not a persrec expert-cache store"):
        open_store(str(foreign))
    assert foreign.read_bytes() == before
    with pytest.raises(ConfigError, match="expected sqlite:///path/to/store.db or redis://host:port/db"):
        open_store("ftp://somewhere")
    with pytest.raises(ConfigError, match="--cache_dtype"):
        open_store(str(path), cache_dtype="int8")


def test_redis_unreachable_is_a_config_error():
    from tests.serve.conftest import free_port

    with pytest.raises(ConfigError, match="cannot reach Redis"):
        open_store(f"redis://127.0.0.1:{free_port()}/0")


def test_layers_of_different_widths_round_trip():
    cache = _cache()
    cache.values = [torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 6)]  # e.g. HSTU v_dim differing per layer
    _assert_same(decode_cache(encode_cache(cache)), cache)

"""Expert-cache stores compared: put/get throughput of real-sized caches, and what float16/bfloat16 cost in accuracy.

Backends: the SQLite store (WAL, the embedded default), one file per user (written atomically: temp file +
rename), LMDB (when the `lmdb` package is installed) and the Redis store (when `redis-server` is on PATH; a
throwaway server is started on a free loopback port). Each puts `--users` caches (sequentially, one
transaction per put, as a server does), then gets them in random order. The cache shape is the serving
benchmark's (HSTU 16 layers, 8 heads of width 8, k = 4 expert tokens); the baseline of the ratios is the
one-file-per-user store measured in the same run.

Accuracy: the same users' recommendations with caches stored in float32, float16 and bfloat16 (random
weights of the benchmark model): the largest score difference and the overlap of the top-10 lists.

    python benchmarks/serving_store.py
    python benchmarks/serving_store.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from persrec.atomic import atomic_path
from persrec.models.base import KVCache
from persrec.serve.redis_local import start_local_redis
from persrec.serve.store import decode_cache, encode_cache


def make_cache(layers: int, heads: int, tokens: int, head_dim: int, seed: int) -> KVCache:
    gen = torch.Generator().manual_seed(seed)
    return KVCache(
        keys=[torch.randn(1, heads, tokens, head_dim, generator=gen) for _ in range(layers)],
        values=[torch.randn(1, heads, tokens, head_dim, generator=gen) for _ in range(layers)],
        positions=torch.arange(1024, 1024 + tokens)[None],
        timestamps=None,
        valid=torch.ones(1, tokens, dtype=torch.bool),
    )


class FileStore:
    """One file per user, replaced atomically (the simplest thing that could work)."""

    def __init__(self, root: Path, dtype: str) -> None:
        self.root, self.dtype = root, dtype
        root.mkdir(parents=True, exist_ok=True)

    def put_cache(self, user: str, fingerprint: str, covered: int, cache: KVCache) -> None:
        with atomic_path(self.root / f"{user}.cache") as tmp:
            tmp.write_bytes(f"{fingerprint}:{covered}\n".encode() + encode_cache(cache, self.dtype))

    def get_cache(self, user: str, fingerprint: str) -> KVCache | None:
        data = (self.root / f"{user}.cache").read_bytes()
        head, _, body = data.partition(b"\n")
        return decode_cache(body) if head.split(b":")[0] == fingerprint.encode() else None

    def close(self) -> None:
        pass


class LMDBStore:
    def __init__(self, root: Path, dtype: str) -> None:
        import lmdb

        self.env, self.dtype = lmdb.open(str(root), map_size=1 << 32), dtype

    def put_cache(self, user: str, fingerprint: str, covered: int, cache: KVCache) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(user.encode(), f"{fingerprint}:{covered}\n".encode() + encode_cache(cache, self.dtype))

    def get_cache(self, user: str, fingerprint: str) -> KVCache | None:
        with self.env.begin() as txn:
            head, _, body = bytes(txn.get(user.encode())).partition(b"\n")
        return decode_cache(body) if head.split(b":")[0] == fingerprint.encode() else None

    def close(self) -> None:
        self.env.close()


def measure(store: object, caches: list[KVCache], fingerprint: str = "model") -> tuple[float, float]:
    start = time.perf_counter()
    for index, cache in enumerate(caches):
        store.put_cache(f"user-{index}", fingerprint, 1024, cache)
    put = len(caches) / (time.perf_counter() - start)
    order = np.random.default_rng(0).permutation(len(caches))
    start = time.perf_counter()
    for index in order:
        found = store.get_cache(f"user-{index}", fingerprint)
        assert found is not None
    get = len(caches) / (time.perf_counter() - start)
    return put, get


def throughput(args: argparse.Namespace, work: Path) -> list[dict]:
    from persrec.serve.store_sqlite import SQLiteStore

    caches = [make_cache(16, 8, 4, 8, seed) for seed in range(args.users)]
    redis = start_local_redis(work)
    rows = []
    try:
        for dtype in ("float32", "float16"):
            backends = {
                "one file per user": lambda d=dtype: FileStore(work / f"files-{d}", d),
                "SQLite (WAL)": lambda d=dtype: SQLiteStore(work / f"sqlite-{d}.db", d),
            }
            try:
                import lmdb  # noqa: F401

                backends["LMDB"] = lambda d=dtype: LMDBStore(work / f"lmdb-{d}", d)
            except ImportError:
                print("lmdb is not installed: LMDB left out (pip install lmdb)")
            if redis is not None:
                from persrec.serve.store_redis import RedisStore

                backends["Redis (loopback)"] = lambda d=dtype: RedisStore(redis.url, d, prefix=f"bench-{d}")
            for name, make in backends.items():
                store = make()
                put, get = measure(store, caches)
                store.close()
                rows.append({"store": name, "dtype": dtype, "put_per_s": put, "get_per_s": get})
    finally:
        if redis is not None:
            redis.stop()
    size = {d: len(encode_cache(caches[0], d)) for d in ("float32", "float16")}
    for row in rows:
        row["bytes"] = size[row["dtype"]]
    return rows


def accuracy(args: argparse.Namespace, work: Path) -> list[dict]:
    """Recommendations through caches stored in each dtype against float32 (random weights, real shapes)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from serving_http import QUICK, Shape, histories, write_model

    from persrec.serve.live import LiveRecommender, RecommendRequest
    from persrec.serve.recommender_api import load_recommender
    from persrec.serve.store import open_store

    shape = QUICK if args.quick else Shape(users=args.accuracy_users)
    model_dir = write_model(work / "model", shape, True)
    rec = load_recommender(model_dir)
    users = histories(shape)
    results = {}
    for dtype in ("float32", "float16", "bfloat16"):
        live = LiveRecommender(rec, open_store(str(work / f"acc-{dtype}.db"), dtype))
        for name, items in users.items():
            live.add_events(name, items)
            live.recommend(RecommendRequest(user_id=name, k=10))  # builds and stores the cache
        results[dtype] = [
            live.recommend(RecommendRequest(user_id=name, k=10)).recommendation for name in users
        ]
        assert live.counters.hits == len(users)
    rows = []
    for dtype in ("float16", "bfloat16"):
        diffs, overlap = [], []
        for ref, got in zip(results["float32"], results[dtype], strict=True):
            overlap.append(len(set(ref.items) & set(got.items)) / 10)
            ref_scores = dict(zip(ref.items, ref.scores, strict=True))
            diffs += [
                abs(ref_scores[i] - s) for i, s in zip(got.items, got.scores, strict=True) if i in ref_scores
            ]
        rows.append(
            {
                "dtype": dtype,
                "max_score_diff": max(diffs),
                "top10_overlap": float(np.mean(overlap)),
                "users": len(users),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--accuracy_users", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.users = 100
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = throughput(args, work)
        acc = accuracy(args, work)
    base = {
        row["dtype"]: (row["put_per_s"], row["get_per_s"])
        for row in rows
        if row["store"] == "one file per user"
    }
    print(f"{args.users} caches of 16 layers x 8 heads x 4 tokens x 8; load average {os.getloadavg()[0]:.2f}")
    print("| store | cache dtype | bytes per cache | put/s | get/s | put x files | get x files |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        put0, get0 = base[row["dtype"]]
        print(
            f"| {row['store']} | {row['dtype']} | {row['bytes']} | {row['put_per_s']:.0f} | {row['get_per_s']:.0f} | "
            f"{row['put_per_s'] / put0:.2f} | {row['get_per_s'] / get0:.2f} |"
        )
    print("\n| cache dtype | users | largest score difference vs float32 | top-10 overlap |")
    print("|---|---|---|---|")
    for row in acc:
        print(
            f"| {row['dtype']} | {row['users']} | {row['max_score_diff']:.2e} | {row['top10_overlap']:.3f} |"
        )


if __name__ == "__main__":
    main()

"""Scale check for ``prepare_dataset``: wall time and peak memory on a large synthetic input.

Generates a random interactions parquet (skewed user activity and item popularity, shuffled
rows) in bounded-memory chunks, prepares it and reports time, throughput and peak RSS. DuckDB
runs inside this process, so RSS is also sampled from /proc during ``prepare``.

    python benchmarks/prepare_scale.py --quick
    python benchmarks/prepare_scale.py --interactions 100000000 --json results.json

The raw-file side (the MerRec builder on synthetic files of MerRec's schema, 1M to 100M rows) is measured by
``benchmarks/merrec_scale.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from persrec.atomic import atomic_write_json
from persrec.data.prepare import PrepareOptions, prepare_dataset

GIB = 1024**3


@dataclass
class GenConfig:
    interactions: int
    users: int
    items: int
    chunk_rows: int
    seed: int


def _power_law_cdf(n: int, exponent: float, shift: float) -> np.ndarray:
    weights = (np.arange(n, dtype=np.float64) + shift) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def generate(cfg: GenConfig, path: Path) -> None:
    """Write ``cfg.interactions`` shuffled rows with sparse int64 ids, chunk by chunk."""
    rng = np.random.default_rng(cfg.seed)
    # Heavy heads (the busiest user has ~0.2% of all rows) and light tails, so the 5-core
    # filter removes users and items and needs several rounds.
    user_cdf = _power_law_cdf(cfg.users, 1.2, 100.0)
    item_cdf = _power_law_cdf(cfg.items, 1.5, 20.0)
    # Sparse, shuffled original ids so dense re-indexing is actually exercised.
    user_ids = rng.permutation(cfg.users).astype(np.int64) * 7 + 1_000
    item_ids = rng.permutation(cfg.items).astype(np.int64) * 3 + 50
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        left = cfg.interactions
        while left > 0:
            n = min(cfg.chunk_rows, left)
            users = user_ids[np.searchsorted(user_cdf, rng.random(n))]
            items = item_ids[np.searchsorted(item_cdf, rng.random(n))]
            stamps = rng.integers(1_400_000_000, 1_700_000_000, size=n, dtype=np.int64)
            table = pa.table({"user_id": users, "item_id": items, "timestamp": stamps}, schema=schema)
            writer.write_table(table, row_group_size=1 << 20)
            left -= n


class RssSampler:
    """Background thread tracking the largest VmRSS of this process."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current_kib() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, self.current_kib())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self.current_kib())


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    cfg = GenConfig(args.interactions, args.users, args.items, args.chunk_rows, args.seed)
    source = workdir / "interactions.parquet"
    start = time.perf_counter()
    # A child process keeps generation memory out of this process's peak RSS.
    proc = mp.get_context("fork").Process(target=generate, args=(cfg, source))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"generation failed with exit code {proc.exitcode}")
    gen_s = time.perf_counter() - start

    options = PrepareOptions(
        min_user_interactions=args.min_user,
        min_item_interactions=args.min_item,
        memory_limit=args.memory_limit,
        threads=args.threads,
    )
    output = workdir / "prepared"
    baseline_kib = RssSampler.current_kib()
    with RssSampler() as sampler:
        start = time.perf_counter()
        dataset = prepare_dataset(source, output, options=options, progress=not args.no_progress)
        prep_s = time.perf_counter() - start
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    child_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        **asdict(cfg),
        "min_user": args.min_user,
        "min_item": args.min_item,
        "memory_limit": args.memory_limit,
        "threads": args.threads,
        "input_gib": round(source.stat().st_size / GIB, 3),
        "generate_s": round(gen_s, 1),
        "prepare_s": round(prep_s, 1),
        "interactions_per_s": round(args.interactions / prep_s),
        "rss_before_prepare_gib": round(baseline_kib / 1024**2, 3),
        "peak_rss_sampled_gib": round(sampler.peak_kib / 1024**2, 3),
        "ru_maxrss_self_gib": round(self_usage.ru_maxrss / 1024**2, 3),
        "ru_maxrss_children_gib": round(child_usage.ru_maxrss / 1024**2, 3),
        "output_gib": round(_dir_size(output) / GIB, 3),
        "kept_users": dataset.num_users,
        "kept_items": dataset.num_items,
        "kept_interactions": dataset.num_interactions,
        "max_history": dataset.max_history,
    }


def markdown(rows: list[dict[str, object]]) -> str:
    cols = [
        "interactions",
        "generate_s",
        "prepare_s",
        "interactions_per_s",
        "peak_rss_sampled_gib",
        "ru_maxrss_self_gib",
        "ru_maxrss_children_gib",
        "input_gib",
        "output_gib",
        "kept_interactions",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interactions", type=int, default=100_000_000)
    p.add_argument("--quick", action="store_true", help="2M interactions, 100k users, 20k items")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--chunk-rows", type=int, default=5_000_000)
    p.add_argument("--min-user", type=int, default=5)
    p.add_argument("--min-item", type=int, default=5)
    p.add_argument("--memory-limit", default="3GB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a fresh directory under /tmp")
    p.add_argument("--keep", action="store_true", help="keep the generated input and prepared output")
    p.add_argument("--json", type=Path, default=None, help="also write the result rows as JSON records")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.interactions, args.users, args.items = 2_000_000, 100_000, 20_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="persrec-prepare-scale-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = [run(args, workdir)]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(rows))
    if args.json is not None:
        atomic_write_json(args.json, rows, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

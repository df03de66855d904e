"""Serving over HTTP: `persrec serve` started on loopback, loaded by 1, 8 and 32 concurrent clients.

Two models with the same backbone shape (HSTU, 16 layers, D = 64, 8 heads, 10,000 items, random weights):

- expert:  PersonalizedHSTU, N = 1280 = P 1024 + R 256, k = 4 expert tokens; each user's expert cache lives
           in the server's store, a request runs the recent window against it (cache hit) or first compresses
           the P history items (cache miss);
- full:    plain HSTU over the same N = 1280 most recent items: every request runs the whole window.

Reported: requests/s, p50/p99 latency per client count (bounded loops, every request checked), errors, the
server's resident memory before and after each phase, the in-process call (`LiveRecommender.recommend`,
batch 1, same store) and the HTTP overhead (HTTP p50 at one client minus the in-process p50). Ratios are
against the full-sequence model measured in the same run. The machine's load average is printed with the
results: other processes on a shared CPU slow every row alike.

    python benchmarks/serving_http.py              # the README table
    python benchmarks/serving_http.py --quick      # a smoke run (small model, few requests)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from persrec.atomic import atomic_write_json
from persrec.config import load_config
from persrec.data.store import ITEM_IDS_FILE
from persrec.train.build import build_model
from persrec.train.checkpoint import save_model_files, save_weights


@dataclass(frozen=True)
class Shape:
    items: int = 10_000
    history: int = 1280  # N
    recent: int = 256  # R
    tokens: int = 4  # k
    layers: int = 16
    dim: int = 64
    heads: int = 8
    users: int = 64
    user_history: int = 1400  # items each benchmark user has (more than N)


QUICK = Shape(items=500, history=40, recent=8, tokens=2, layers=2, dim=16, heads=2, users=8, user_history=60)


def write_model(root: Path, shape: Shape, expert: bool) -> Path:
    overrides = {
        "model": "PersonalizedHSTU" if expert else "HSTU",
        "MAX_ITEM_LIST_LENGTH": shape.history,
        "n_layers": shape.layers,
        "n_heads": shape.heads,
        "item_embedding_size": shape.dim,
        "hidden_dropout_prob": 0.0,
    }
    if expert:
        overrides |= {
            "number_of_user_tokens": shape.tokens,
            "pretrain_item_num": shape.history - shape.recent,
            "recent_item_num": shape.recent,
        }
    config = load_config(None, overrides)
    data = root / "dataset"
    data.mkdir(parents=True, exist_ok=True)
    ids = pa.array(range(1, shape.items + 1), pa.int32())
    pq.write_table(
        pa.table({"item_idx": ids, "item_id": [100_000 + i for i in range(shape.items)]}),
        data / ITEM_IDS_FILE,
    )
    torch.manual_seed(0)
    model = build_model(config, shape.items, 0)
    fingerprint = {"path": str(data), "num_users": 0, "num_items": shape.items, "num_interactions": 0}
    fingerprint |= {"manifest_sha256": "", "item_id_map_sha256": ""}
    best = root / "best"
    save_model_files(best, config, fingerprint, data, model)
    save_weights(model, best / "model.safetensors")
    return best


def histories(shape: Shape, seed: int = 1) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    return {
        f"user-{u}": (100_000 + rng.integers(0, shape.items, shape.user_history)).tolist()
        for u in range(shape.users)
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`persrec serve` in a subprocess on a free loopback port."""

    def __init__(self, model_dir: Path, store: Path, threads: int) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "persrec.cli", "serve", str(model_dir), "--port", str(self.port)]
        command += ["--store", f"sqlite:///{store}", "--log_level", "warning", "--threads", str(threads)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(600):
            try:
                self.call("GET", "/health")
                return
            except OSError:
                if self.process.poll() is not None:
                    raise SystemExit(f"the server did not start: {self.process.stderr.read()}") from None
                time.sleep(0.1)
        raise SystemExit("the server did not answer /health within 60 s")

    def call(
        self, method: str, path: str, body: dict | None = None, conn: http.client.HTTPConnection | None = None
    ):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        payload = None if body is None else json.dumps(body)
        conn.request(method, path, payload, {"content-type": "application/json"} if body is not None else {})
        answer = conn.getresponse()
        data = answer.read()
        if own:
            conn.close()
        return answer.status, data

    @property
    def rss(self) -> float:
        return rss_mib(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def load(server: Server, bodies: list[dict], clients: int, expect_items: int) -> dict:
    """Send `bodies` (POST /recommend) from `clients` threads with keep-alive connections."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    next_index = [0]

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        while True:
            with lock:
                if next_index[0] >= len(bodies):
                    break
                body = bodies[next_index[0]]
                next_index[0] += 1
            start = time.perf_counter()
            try:
                status, data = server.call("POST", "/recommend", body, conn)
                ok = status == 200 and len(json.loads(data)["items"]) == expect_items
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok
        conn.close()

    rss_before = server.rss
    samples: list[tuple[int, float]] = []  # (requests done, RSS MiB), every 0.25 s: is memory flat?
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            samples.append((len(latencies), server.rss))

    sampler = threading.Thread(target=sample)
    sampler.start()
    wall = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    done.set()
    sampler.join()
    half = len(bodies) // 2
    first_half = [rss for count, rss in samples if count < half] or [rss_before]
    second_half = [rss for count, rss in samples if count >= half] or [server.rss]
    ms = np.asarray(latencies) * 1e3
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rss_before_mib": rss_before,
        "rss_after_mib": server.rss,
        "rss_max_first_half_mib": max(first_half),
        "rss_max_second_half_mib": max(second_half),
    }


def in_process(model_dir: Path, store: Path, users: dict[str, list[int]], repeats: int, threads: int) -> dict:
    """Batch-1 `LiveRecommender.recommend` timings: cache hits, misses (compress first) and one HTTP-free call."""
    from persrec.serve.live import LiveRecommender, RecommendRequest
    from persrec.serve.recommender_api import load_recommender
    from persrec.serve.store import open_store

    rec = load_recommender(model_dir, threads=threads)
    live = LiveRecommender(rec, open_store(str(store)))
    names = list(users)
    for name in names:
        live.add_events(name, users[name])
    miss, hit, hit_cpu = [], [], []
    for index in range(repeats):
        name = names[index % len(names)]
        if index < len(names):  # the first request of a user compresses its history
            start = time.perf_counter()
            live.recommend(RecommendRequest(user_id=name, k=10))
            miss.append(time.perf_counter() - start)
        start, cpu = time.perf_counter(), time.process_time()
        result = live.recommend(RecommendRequest(user_id=name, k=10))
        hit.append(time.perf_counter() - start)
        hit_cpu.append(time.process_time() - cpu)
        assert len(result.recommendation.items) == 10 and result.cache in ("hit", "none")
    return live, {
        "hit_p50_ms": statistics.median(hit) * 1e3,
        "hit_p99_ms": float(np.percentile(np.asarray(hit) * 1e3, 99)),
        "hit_cpu_p50_ms": statistics.median(hit_cpu) * 1e3,
        "miss_p50_ms": statistics.median(miss) * 1e3,
    }


def http_overhead(live, server: Server, names: list[str], repeats: int) -> dict:
    """The same cache-hit request in-process and over HTTP, alternated so that both see the same load."""
    from persrec.serve.live import RecommendRequest

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    local, remote = [], []
    for index in range(repeats):
        name = names[index % len(names)]
        start = time.perf_counter()
        live.recommend(RecommendRequest(user_id=name, k=10))
        local.append(time.perf_counter() - start)
        start = time.perf_counter()
        status, _ = server.call("POST", "/recommend", {"user_id": name, "k": 10}, conn)
        remote.append(time.perf_counter() - start)
        assert status == 200
    conn.close()
    return {
        "paired_inproc_p50_ms": statistics.median(local) * 1e3,
        "paired_http_p50_ms": statistics.median(remote) * 1e3,
        "http_overhead_p50_ms": (statistics.median(remote) - statistics.median(local)) * 1e3,
    }


def run_model(label: str, model_dir: Path, shape: Shape, work: Path, args: argparse.Namespace) -> list[dict]:
    users = histories(shape)
    rows = []
    live, inproc = in_process(
        model_dir, work / f"{label}-inproc.db", users, args.inproc_repeats, args.threads
    )
    server = Server(model_dir, work / f"{label}-server.db", args.threads)
    try:
        for name, items in users.items():
            server.call("POST", "/events", {"user_id": name, "items": items})
        names = list(users)
        # Cache misses: every user's first request (the expert model compresses P items).
        rss_start = server.rss
        first = load(server, [{"user_id": n, "k": 10} for n in names], 1, 10)
        rows.append({"model": label, "phase": "first request (miss)", **first})
        for clients in (1, 8, 32):
            count = args.requests if label == "expert" else max(clients * 4, args.requests // 8)
            bodies = [{"user_id": names[i % len(names)], "k": 10} for i in range(count)]
            result = load(server, bodies, clients, 10)
            rows.append({"model": label, "phase": f"{clients} client(s)", **result})
        health = []
        for _ in range(200):
            start = time.perf_counter()
            server.call("GET", "/health")
            health.append(time.perf_counter() - start)
        rows[-1]["rss_start_mib"] = rss_start
        paired = http_overhead(live, server, names, args.overhead_repeats if label == "expert" else 20)
    finally:
        server.stop()
        live.store.close()
    for row in rows:
        row["inproc_hit_p50_ms"] = inproc["hit_p50_ms"]
        row["inproc_hit_p99_ms"] = inproc["hit_p99_ms"]
        row["inproc_miss_p50_ms"] = inproc["miss_p50_ms"]
        row["inproc_hit_cpu_p50_ms"] = inproc["hit_cpu_p50_ms"]
        row["health_p50_ms"] = statistics.median(health) * 1e3
        row |= paired
    return rows


def markdown(rows: list[dict], baseline: dict[str, float]) -> str:
    lines = [
        "| model | phase | requests | errors | req/s | p50 ms | p99 ms | x full (req/s) | server RSS MiB: before, "
        "max in 1st / 2nd half, after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = row["rps"] / baseline[row["phase"]] if row["phase"] in baseline else float("nan")
        lines.append(
            f"| {row['model']} | {row['phase']} | {row['requests']} | {row['errors']} | {row['rps']:.1f} | "
            f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {ratio:.2f} | "
            f"{row['rss_before_mib']:.0f}, {row['rss_max_first_half_mib']:.0f} / {row['rss_max_second_half_mib']:.0f}, "
            f"{row['rss_after_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small model and few requests (smoke test)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per client count (expert model)")
    parser.add_argument("--inproc_repeats", type=int, default=300)
    parser.add_argument("--overhead_repeats", type=int, default=300, help="alternated in-process/HTTP calls")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    shape = QUICK if args.quick else Shape()
    if args.quick:
        args.requests, args.inproc_repeats = min(args.requests, 64), min(args.inproc_repeats, 20)
        args.overhead_repeats = min(args.overhead_repeats, 20)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        expert_dir = write_model(work / "expert", shape, True)
        full_dir = write_model(work / "full", shape, False)
        rows = run_model("full", full_dir, shape, work, args) + run_model(
            "expert", expert_dir, shape, work, args
        )
    baseline = {row["phase"]: row["rps"] for row in rows if row["model"] == "full"}
    print(
        f"HSTU {shape.layers} layers, D {shape.dim}, N {shape.history} (P {shape.history - shape.recent}, "
        f"R {shape.recent}, k {shape.tokens}), {shape.items} items; load average {os.getloadavg()[0]:.2f}, "
        f"{os.cpu_count()} CPUs"
    )
    print(markdown(rows, baseline))
    for label in ("expert", "full"):
        row = next(r for r in rows if r["model"] == label and r["phase"] == "1 client(s)")
        print(
            f"{label}: in-process batch-1 call p50 {row['inproc_hit_p50_ms']:.2f} ms (p99 {row['inproc_hit_p99_ms']:.2f}, "
            f"CPU {row['inproc_hit_cpu_p50_ms']:.2f} ms), "
            f"first call of a user {row['inproc_miss_p50_ms']:.2f} ms; alternated with HTTP: in-process "
            f"{row['paired_inproc_p50_ms']:.2f} ms, HTTP {row['paired_http_p50_ms']:.2f} ms p50 -> HTTP overhead "
            f"{row['http_overhead_p50_ms']:.2f} ms; GET /health p50 {row['health_p50_ms']:.2f} ms"
        )
    last = next(r for r in rows if r["model"] == "expert" and r["phase"] == "32 client(s)")
    print(
        f"expert server RSS: {last['rss_start_mib']:.0f} MiB after the users' first requests, "
        f"{last['rss_after_mib']:.0f} MiB at the end"
    )
    if args.json:
        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()

"""Prometheus text exposition for `persrec serve`: request counts, latency histogram, expert-cache counters.

Small enough to keep here rather than depend on prometheus_client: counters and one histogram family, all
updated under one lock (requests are served by a thread pool).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}')
        running += self.counts[-1]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {running}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.total:.6f}", f"{name}_count{suffix} {running}"]
        return out


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.cache: dict[str, int] = {"hit": 0, "miss": 0, "refresh": 0}
        self.staleness = Histogram(STALENESS_BUCKETS)
        self.batch_sizes = Histogram((1, 2, 4, 8, 16, 32, 64))

    def request(self, method: str, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, path, status)] += 1
            self.latency.setdefault(path, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def served(self, cache: str, staleness: int) -> None:
        with self._lock:
            if cache in self.cache:
                self.cache[cache] += 1
                self.staleness.observe(staleness)

    def batch(self, size: int) -> None:
        with self._lock:
            self.batch_sizes.observe(size)

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP persrec_requests_total HTTP requests by method, path and status.",
                "# TYPE persrec_requests_total counter",
            ]
            for (method, path, status), count in sorted(self.requests.items()):
                lines.append(
                    f'persrec_requests_total{{method="{method}",path="{path}",status="{status}"}} {count}'
                )
            lines += [
                "# HELP persrec_request_seconds Request latency in seconds, by path.",
                "# TYPE persrec_request_seconds histogram",
            ]
            for path, histogram in sorted(self.latency.items()):
                lines += histogram.lines("persrec_request_seconds", f'path="{path}"')
            for kind, what in (("hit", "hits"), ("miss", "misses"), ("refresh", "refreshes")):
                name = f"persrec_expert_cache_{what}_total"
                lines += [
                    f"# HELP {name} Recommendations served with a stored expert cache ({kind}).",
                    f"# TYPE {name} counter",
                    f"{name} {self.cache[kind]}",
                ]
            lines += [
                "# HELP persrec_staleness_interactions Interactions since the served cache was built.",
                "# TYPE persrec_staleness_interactions histogram",
                *self.staleness.lines("persrec_staleness_interactions"),
                "# HELP persrec_batch_size Requests scored together in one forward pass.",
                "# TYPE persrec_batch_size histogram",
                *self.batch_sizes.lines("persrec_batch_size"),
            ]
        return "\n".join(lines) + "\n"

"""A throwaway `redis-server` on a free loopback port (no persistence), for trying the Redis store locally and
for the tests and benchmarks that run against a real server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LocalRedis:
    process: subprocess.Popen
    url: str

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_local_redis(workdir: Path, timeout_s: float = 5.0) -> LocalRedis | None:
    """Start `redis-server` with its files in `workdir` and wait until it accepts connections; None when the
    binary is not on PATH (Debian: apt-get install redis-server). A server that does not come up in time is
    stopped and reported with RuntimeError."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(
        [*command, "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    server = LocalRedis(process, f"redis://127.0.0.1:{port}/0")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(16).startswith(b"+PONG"):
                    return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"redis-server did not answer on port {port} within {timeout_s} s")

"""Fixtures for the serving tests: tiny model directories and a real redis-server on a free loopback port."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from tests.serve.model_dirs import write_model_dir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run directory with random weights per backbone shape (plain and personalized)."""
    from tests.serve.model_dirs import SHAPES

    root = tmp_path_factory.mktemp("models")
    for shape in SHAPES:
        write_model_dir(root / shape, shape)
    return {shape: root / shape for shape in SHAPES}


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway redis-server (no persistence) for the test session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server); .ci/run installs it")
    pytest.importorskip(
        "redis", reason="the redis client is part of the test extra: pip install -e '.[test]'"
    )
    from persrec.serve.redis_local import start_local_redis

    server = start_local_redis(tmp_path_factory.mktemp("redis"))
    assert server is not None  # the binary was found above
    yield server.url
    server.stop()

"""Shared fixtures: a tiny prepared dataset that every integration test can train on in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from persrec.data.datasets.synthetic import SyntheticConfig, generate_synthetic
from persrec.data.prepare import prepare_dataset

TINY = SyntheticConfig(
    num_users=48, num_items=60, mean_history=24, min_history=6, max_history=50, num_interests=6, seed=3
)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a prepared synthetic dataset with 48 users and at most 60 items."""
    root = tmp_path_factory.mktemp("tiny")
    built = generate_synthetic(TINY, root / "raw")
    prepare_dataset(built.interactions, root / "prepared", items=built.items, progress=False)
    return root / "prepared"


def tiny_overrides(dataset: Path, run_dir: Path, **extra: object) -> dict[str, object]:
    """Config overrides for a model small enough to train a few steps in well under a second."""
    return {
        "dataset": str(dataset),
        "model": "HSTU",
        "MAX_ITEM_LIST_LENGTH": 16,
        "n_layers": 1,
        "n_heads": 2,
        "item_embedding_size": 16,
        "num_negatives": 16,
        "epochs": 2,
        "train_batch_size": 8,
        "eval_batch_size": 16,
        "checkpoint_dir": str(run_dir),
        "run_name": "run",
        "show_progress": False,
        "topk": [5, 10],
        **extra,
    }


def cli_flags(overrides: dict[str, object]) -> list[str]:
    """Config overrides as `persrec train` flags (lists comma-joined)."""
    flags: list[str] = []
    for key, value in overrides.items():
        flags += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process and every descendant. torchrun starts each worker in a session of its own, so a
    signal to the launcher's process group leaves the workers running (read from /proc, Linux only)."""
    import contextlib
    import os
    import signal

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack += children.get(current, [])
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def torchrun_command(processes: int = 2) -> list[str]:
    """`python -m torch.distributed.run` on a free loopback port (torchrun needs a concrete one)."""
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(port),
    ]

"""Metric logs of a run: CSV (always readable, no dependency) or TensorBoard (optional extra)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from persrec.atomic import atomic_path


class MetricLogger:
    def log(self, step: int, values: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NullLogger(MetricLogger):
    def log(self, step: int, values: dict[str, Any]) -> None:
        pass


class CSVLogger(MetricLogger):
    """One row per call in `metrics.csv`, rewritten whole (atomically) each time.

    The file starts from `rows` (the records of the checkpoint a run resumes from), never from what a killed
    process left on disk: rows it logged after its last checkpoint are trained again and would appear twice.
    """

    def __init__(self, path: Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = list(rows or [])
        if self.rows or path.is_file():
            self._write()

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.rows.append({"step": step, **values})
        self._write()

    def _write(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [c for c in row if c not in columns]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)


class TensorBoardLogger(MetricLogger):
    def __init__(self, path: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # pragma: no cover - depends on the optional extra
            raise ImportError(
                "logger=tensorboard needs the tensorboard package: pip install 'persrec[tensorboard]' "
                "(or use logger=csv)"
            ) from error
        self.writer = SummaryWriter(str(path))

    def log(self, step: int, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def build_logger(
    kind: str, run_dir: Path, enabled: bool, history: list[dict[str, Any]] | None = None
) -> MetricLogger:
    """`history`: the per-epoch records of the checkpoint being resumed (each with its `step`)."""
    if not enabled or kind == "none":
        return NullLogger()
    if kind == "csv":
        rows = [
            {"step": r.get("step", 0), **{k: v for k, v in r.items() if k != "step"}} for r in history or []
        ]
        return CSVLogger(run_dir / "metrics.csv", rows)
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir / "tensorboard")
    raise ValueError(f"logger={kind!r}: expected csv, tensorboard or none")

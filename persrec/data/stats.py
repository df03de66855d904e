"""Summary statistics of a prepared dataset: what a user checks before choosing the window sizes P and R.

Everything is computed from the memory-mapped store in chunks of whole users, so a dataset larger than memory is
summarised without loading it: history-length quantiles come from the offsets, the time span from the timestamps,
the repeat rate from the distinct (user, item) pairs of each chunk, text coverage from the item table's columns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from persrec.atomic import atomic_path
from persrec.config import ConfigError
from persrec.data.store import PreparedDataset

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
_CHUNK = 1 << 24  # interactions per repeat-rate chunk


@dataclass(frozen=True)
class DatasetStats:
    users: int
    items: int
    interactions: int
    history_min: int
    history_mean: float
    history_quantiles: dict[str, float]
    history_max: int
    first_time: int | None
    last_time: int | None
    # Share of interactions whose item the same user already had earlier (re-views, re-purchases).
    repeat_rate: float
    # Per text column of the item table: share of the items with non-empty text.
    text_coverage: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def repeat_count(dataset: PreparedDataset) -> int:
    """Interactions minus distinct (user, item) pairs, counted chunk by chunk of whole users."""
    offsets = dataset.offsets
    items = dataset.items
    width = np.int64(dataset.num_items + 1)
    repeats = 0
    user = 0
    while user < dataset.num_users:
        stop = int(np.searchsorted(offsets, offsets[user] + _CHUNK, side="right")) - 1
        stop = min(max(stop, user + 1), dataset.num_users)
        lo, hi = int(offsets[user]), int(offsets[stop])
        owners = np.repeat(np.arange(user, stop, dtype=np.int64), np.diff(offsets[user : stop + 1]))
        keys = owners * width + np.asarray(items[lo:hi], dtype=np.int64)
        repeats += (hi - lo) - len(np.unique(keys))
        user = stop
    return repeats


def _is_text(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def _is_list(dtype: pa.DataType) -> bool:
    return pa.types.is_list(dtype) or pa.types.is_large_list(dtype)


def text_coverage(table: pa.Table | None, num_items: int) -> dict[str, float]:
    """Share of items whose text column is non-empty (strings: not blank; lists: at least one element)."""
    if table is None or num_items == 0:
        return {}
    out: dict[str, float] = {}
    for name in table.column_names:
        if name in ("item_idx", "item_id"):
            continue
        column = table[name]
        if _is_text(column.type):
            filled = pc.sum(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)).as_py()
        elif _is_list(column.type):
            filled = pc.sum(pc.greater(pc.list_value_length(column), 0)).as_py()
        else:
            continue
        out[name] = (filled or 0) / num_items
    return out


def dataset_stats(dataset: PreparedDataset) -> DatasetStats:
    lengths = dataset.lengths()
    timestamps = dataset.timestamps
    if len(lengths):
        quantiles = np.quantile(lengths, QUANTILES)
        q = {f"p{round(p * 100)}": float(v) for p, v in zip(QUANTILES, quantiles, strict=True)}
    else:
        q = {}
    has_time = len(timestamps) > 0
    return DatasetStats(
        users=dataset.num_users,
        items=dataset.num_items,
        interactions=dataset.num_interactions,
        history_min=int(lengths.min()) if len(lengths) else 0,
        history_mean=float(lengths.mean()) if len(lengths) else 0.0,
        history_quantiles=q,
        history_max=int(lengths.max()) if len(lengths) else 0,
        first_time=int(timestamps.min()) if has_time else None,
        last_time=int(timestamps.max()) if has_time else None,
        repeat_rate=repeat_count(dataset) / dataset.num_interactions if dataset.num_interactions else 0.0,
        text_coverage=text_coverage(dataset.item_table(), dataset.num_items),
    )


def _date(epoch: int | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_stats(stats: DatasetStats, path: Path | None = None) -> str:
    quantiles = ", ".join(f"{k} {v:g}" for k, v in stats.history_quantiles.items())
    lines = [f"dataset: {path}"] if path is not None else []
    lines += [
        f"users: {stats.users:,}",
        f"items: {stats.items:,}",
        f"interactions: {stats.interactions:,}",
        f"history length: min {stats.history_min}, mean {stats.history_mean:.1f}, {quantiles}, max {stats.history_max}",
    ]
    if stats.first_time is not None and stats.last_time is not None:
        days = (stats.last_time - stats.first_time) / 86400
        lines.append(f"time span: {_date(stats.first_time)} to {_date(stats.last_time)} ({days:,.1f} days)")
    lines.append(f"repeat rate: {stats.repeat_rate:.2%} of interactions revisit an item the user already had")
    if stats.text_coverage:
        cover = ", ".join(f"{k} {v:.1%}" for k, v in stats.text_coverage.items())
        lines.append(f"text coverage (items with non-empty text): {cover}")
    else:
        lines.append("text coverage: no item text table")
    return "\n".join(lines)


def plot_history_histogram(lengths: np.ndarray, path: Path, title: str = "") -> Path:
    """A PNG histogram of history lengths (log-spaced bins when lengths span orders of magnitude)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(
            "--plot needs matplotlib, which is in the plot extra: pip install 'persrec[plot]'"
        ) from exc
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--plot {path}: expected a .png file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--plot {path}: folder {path.parent} does not exist")
    lo, hi = max(int(lengths.min()), 1), max(int(lengths.max()), 1)
    log_scale = hi / lo > 100
    bins = np.geomspace(lo, hi + 1, 50) if log_scale else min(50, hi - lo + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=bins, color="#4477aa")
    if log_scale:
        ax.set_xscale("log")
    ax.set_xlabel("history length (interactions per user)")
    ax.set_ylabel("users")
    ax.set_title(title or "history length")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path

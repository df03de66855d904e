"""Accuracy against history length: full-sequence HSTU, recent-only HSTU and PerSRec HSTU (the paper's Figure 1).

The paper's claim: personalized experts recover (almost) all of the accuracy of attending to the full history while
serving only the recent window. This script trains, with one small HSTU and one epoch budget for every run,
- ``full``: HSTU over the last ``L`` items for each history length ``L`` (the largest ``L`` is "the full history"),
- ``recent``: HSTU over the last ``R`` items only (``R`` = full / 5 by default),
- ``persrec``: PersonalizedHSTU over ``P + R`` = full items, ``k`` expert tokens after the ``P`` history items,
selects each run's epoch on validation NDCG@10 and reports test Recall@10 / NDCG@10, as a markdown table, a PNG
plot and (``--json``) one record per run. Trainings are ``persrec train`` subprocesses writing to
``OUTPUT/runs/<name>``; a run whose ``results.json`` exists is skipped and an interrupted one is resumed, so the
script can be stopped (or cut by ``--deadline_minutes``) and started again.

    python benchmarks/history_length.py --quick
    python benchmarks/history_length.py --datasets synthetic ml-1m --json history_length.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from persrec.atomic import atomic_write_json, atomic_write_text
from persrec.data.datasets.registry import resolve_dataset
from persrec.data.datasets.synthetic import SyntheticConfig
from persrec.data.store import PreparedDataset

DEFAULT_OUTPUT = Path("benchmarks/results/history_length")
METRICS = ("recall@10", "ndcg@10")
WALL_FILE = "bench_wall.json"


@dataclass(frozen=True)
class DatasetPlan:
    """What to train on one dataset: window lengths, the recent window, expert counts and the epoch budget."""

    name: str
    lengths: tuple[int, ...]
    recent: int
    experts: tuple[int, ...]
    epochs: int
    stopping_step: int
    train_batch_size: int
    # Seen items stay rankable where repeats are the norm (synthetic); ML-1M ratings never repeat a movie.
    filter_seen: bool
    extra: dict[str, str] = field(default_factory=dict)
    # Generator settings of a synthetic plan (prepared once, then passed to `persrec train` as a path).
    synthetic: SyntheticConfig | None = None

    @property
    def full(self) -> int:
        return max(self.lengths)


@dataclass(frozen=True)
class Run:
    dataset: str
    variant: str  # full | recent | persrec
    history_length: int  # items the model reads: L, R or P + R
    P: int | None
    R: int | None
    k: int

    @property
    def name(self) -> str:
        if self.variant == "persrec":
            return f"{self.dataset}-persrec-P{self.P}-R{self.R}-k{self.k}"
        return f"{self.dataset}-{self.variant}-L{self.history_length}"


@dataclass
class Record:
    """One run's outcome; metrics are None when the run has not finished."""

    dataset: str
    variant: str
    history_length: int
    P: int | None
    R: int | None
    k: int
    recall_at_10: float | None
    ndcg_at_10: float | None
    epochs: int | None
    wall_s: float | None
    best_epoch: int | None = None
    valid_ndcg_at_10: float | None = None
    filter_seen: bool | None = None
    status: str = "not run"
    run_name: str = ""

    def to_json(self) -> dict[str, Any]:
        """Field names of the published records (``recall@10`` rather than the Python-safe attribute)."""
        out = asdict(self)
        out["recall@10"] = out.pop("recall_at_10")
        out["ndcg@10"] = out.pop("ndcg_at_10")
        out["valid_ndcg@10"] = out.pop("valid_ndcg_at_10")
        return out


# ------------------------------------------------------------------------------------------------------ plans

# One backbone for every run, so the only thing that changes is what the model reads.
MODEL_ARGS = {
    "n_layers": "2",
    "n_heads": "1",
    "item_embedding_size": "50",
    "optim_args.learning_rate": "1e-3",  # plans may override
    "valid_metric": "ndcg@10",
    "eval_interval": "1",
    "popularity_baseline": "false",
    "show_progress": "false",
}


# Users whose long-term interests are many (8 of 50 clusters) and carry most of the traffic (60 %), while the
# short-term interest drifts every ~10 items: the last 16 items show only some of the long-term clusters, the
# last 200 show them all. That is the regime where a long history should pay off.
LONG_INTEREST_SYNTHETIC = SyntheticConfig(
    num_users=3000,
    mean_history=250.0,
    long_term_interests_per_user=8,
    long_term_share=0.6,
    short_term_drift=10.0,
)


def dataset_plans(quick: bool) -> dict[str, DatasetPlan]:
    """Budgets sized for ~90 minutes of one shared CPU core (``--quick``: about a minute)."""
    if quick:
        tiny_data = replace(LONG_INTEREST_SYNTHETIC, num_users=200)
        tiny = DatasetPlan("synthetic", (16, 32), 8, (1, 4), 1, 1, 32, False, synthetic=tiny_data)
        return {"synthetic": tiny, "ml-1m": DatasetPlan("ml-1m", (16, 32), 8, (1, 4), 1, 1, 128, True)}
    return {
        # One window per user and epoch gives few steps per epoch: a higher learning rate gets both data sets
        # past their early plateau inside the budget (measured: synthetic L=50, validation NDCG@10 after 8
        # epochs 0.067 at 1e-3, 0.100 at 4e-3).
        "synthetic": DatasetPlan(
            "synthetic",
            (16, 50, 100, 200),
            16,
            (1, 4, 16),
            25,
            5,
            64,
            False,
            {"optim_args.learning_rate": "4e-3"},
            synthetic=LONG_INTEREST_SYNTHETIC,
        ),
        # One ML-1M epoch at 200 items costs ~35 s of a shared core; 200 items cover the whole history of ~3/4
        # of the users.
        "ml-1m": DatasetPlan(
            "ml-1m", (50, 100, 200), 40, (1, 4, 16), 15, 5, 128, True, {"optim_args.learning_rate": "2e-3"}
        ),
    }


def plan_runs(plan: DatasetPlan) -> list[Run]:
    """Runs in priority order: those the main claim needs first, then the rest of the full-sequence curve."""
    full, recent = plan.full, plan.recent
    claim = [Run(plan.name, "full", full, None, None, 0), Run(plan.name, "recent", recent, None, recent, 0)]
    experts = sorted(plan.experts, key=lambda k: (k != 4, k))
    claim += [Run(plan.name, "persrec", full, full - recent, recent, k) for k in experts]
    curve = [Run(plan.name, "full", n, None, None, 0) for n in sorted(plan.lengths) if n != full]
    return claim + curve


def open_dataset(plan: DatasetPlan, cache_dir: str | None) -> PreparedDataset:
    """The plan's prepared dataset (built and cached on first use)."""
    cache = Path(cache_dir) if cache_dir else None
    return resolve_dataset(plan.name, cache_dir=cache, synthetic=plan.synthetic, progress=False)


def train_args(run: Run, plan: DatasetPlan, runs_dir: Path, dataset: Path) -> list[str]:
    """`persrec train` flags of one run; `dataset` is the plan's prepared dataset directory."""
    args = {
        **MODEL_ARGS,
        **plan.extra,
        "dataset": str(dataset),
        "MAX_ITEM_LIST_LENGTH": str(run.history_length),
        "epochs": str(plan.epochs),
        "stopping_step": str(plan.stopping_step),
        "train_batch_size": str(plan.train_batch_size),
        "filter_seen": str(plan.filter_seen).lower(),
        "checkpoint_dir": str(runs_dir),
        "run_name": run.name,
    }
    if run.variant == "persrec":
        args |= {
            "model": "PersonalizedHSTU",
            "number_of_user_tokens": str(run.k),
            "insert_method": "0",
            "pretrain_item_num": str(run.P),
            "recent_item_num": str(run.R),
        }
    else:
        args["model"] = "HSTU"
    return [token for key, value in args.items() for token in (f"--{key}", value)]


# ---------------------------------------------------------------------------------------------------- running


def _has_checkpoint(run_dir: Path) -> bool:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.is_file() and (run_dir / "checkpoints" / pointer.read_text().strip()).is_dir()


def _wall(run_dir: Path) -> float:
    path = run_dir / WALL_FILE
    return float(json.loads(path.read_text())["wall_s"]) if path.is_file() else 0.0


def execute(run: Run, plan: DatasetPlan, runs_dir: Path, dataset: Path, deadline: float | None) -> bool:
    """Train one run to completion (resuming if it was interrupted); False if the deadline cut it."""
    run_dir = runs_dir / run.name
    if (run_dir / "results.json").is_file():
        return True
    if deadline is not None and time.time() >= deadline:
        return False
    cmd = [str(Path(sys.executable).parent / "persrec"), "train", *train_args(run, plan, runs_dir, dataset)]
    if _has_checkpoint(run_dir):
        cmd += ["--resume", str(run_dir)]
    run_dir.mkdir(parents=True, exist_ok=True)
    # One thread per training: the experiment shares its machine and must stay on one core.
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"[{time.strftime('%H:%M:%S')}] {run.name}: {' '.join(cmd[1:])}", flush=True)
    started = time.time()
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            if deadline is not None and time.time() >= deadline:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                break
            time.sleep(2.0)
    elapsed = time.time() - started
    atomic_write_json(run_dir / WALL_FILE, {"wall_s": _wall(run_dir) + elapsed})
    done = (run_dir / "results.json").is_file()
    status = "done" if done else f"stopped (exit {proc.returncode}; see {run_dir / 'train.log'})"
    print(f"[{time.strftime('%H:%M:%S')}] {run.name}: {status} after {elapsed:.0f} s", flush=True)
    return done


def _epochs_trained(run_dir: Path) -> int | None:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        epochs = {row["epoch"] for row in csv.DictReader(handle) if row.get("epoch")}
    return len(epochs)


def collect(run: Run, runs_dir: Path) -> Record:
    run_dir = runs_dir / run.name
    record = Record(
        run.dataset,
        run.variant,
        run.history_length,
        run.P,
        run.R,
        run.k,
        None,
        None,
        None,
        None,
        run_name=run.name,
    )
    results = run_dir / "results.json"
    if not results.is_file():
        if run_dir.is_dir():
            record.status = "unfinished"
        return record
    data = json.loads(results.read_text())
    record.recall_at_10 = float(data["test"]["recall@10"])
    record.ndcg_at_10 = float(data["test"]["ndcg@10"])
    record.valid_ndcg_at_10 = float(data["valid"]["ndcg@10"])
    record.best_epoch = data.get("best_epoch")
    record.filter_seen = data.get("filter_seen")
    record.epochs = _epochs_trained(run_dir)
    record.wall_s = round(_wall(run_dir), 1)
    record.status = "done"
    return record


# ---------------------------------------------------------------------------------------------------- report


def popularity_baseline(plan: DatasetPlan, store: PreparedDataset) -> dict[str, float]:
    """Test Recall@10 / NDCG@10 of ranking by training-item popularity: the floor any model has to clear."""
    from torch.utils.data import DataLoader

    from persrec.data.sequences import EvalSequences, WindowConfig, collate
    from persrec.eval.ranking import EvalConfig
    from persrec.eval.runner import evaluate_popularity_baseline, training_item_frequencies

    examples = EvalSequences(store, "test", WindowConfig(max_length=1), with_seen=plan.filter_seen)
    loader = DataLoader(examples, batch_size=512, collate_fn=collate)
    config = EvalConfig(ks=(10,), filter_seen=plan.filter_seen, ties="pessimistic")
    result = evaluate_popularity_baseline(store, loader, config, training_item_frequencies(store))
    return {metric: float(result[metric]) for metric in METRICS}


def _synthetic_summary(config: SyntheticConfig) -> str:
    """The generator settings that differ from `SyntheticConfig()`'s defaults, as key=value pairs."""
    default = SyntheticConfig()
    return ", ".join(f"{k}={v}" for k, v in asdict(config).items() if getattr(default, k) != v)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "not run" if value is None else f"{value:.{digits}f}"


def _gap(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "–"
    return f"{100.0 * (value - base) / base:+.1f} %"


def _reference(records: list[Record], variant: str) -> Record | None:
    """The full-history run (largest full length) or the recent-only run, when finished."""
    candidates = [r for r in records if r.variant == variant and r.ndcg_at_10 is not None]
    return max(candidates, key=lambda r: r.history_length) if candidates else None


def markdown_table(records: list[Record], baselines: dict[str, dict[str, float]] | None = None) -> str:
    """One table per dataset, with the relative NDCG@10 gaps of every run to full-history and recent-only
    (and the popularity ranking's test metrics when ``baselines`` has them)."""
    lines: list[str] = []
    order = {"full": 0, "recent": 1, "persrec": 2}
    for dataset in dict.fromkeys(r.dataset for r in records):
        rows = sorted(
            (r for r in records if r.dataset == dataset),
            key=lambda r: (order[r.variant], r.history_length, r.k),
        )
        full, recent = _reference(rows, "full"), _reference(rows, "recent")
        seen = next((r.filter_seen for r in rows if r.filter_seen is not None), None)
        lines += [f"### {dataset}", ""]
        if seen is not None:
            lines += [f"filter_seen={str(seen).lower()}; test metrics at the best validation epoch.", ""]
        lines += [
            "| variant | items read | P | R | k | Recall@10 | NDCG@10 | NDCG vs full | NDCG vs recent "
            "| epochs (best) | wall s |",
            "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in rows:
            epochs = "–" if r.epochs is None else f"{r.epochs} ({r.best_epoch})"
            lines.append(
                f"| {r.variant} | {r.history_length} | {r.P if r.P is not None else '–'} "
                f"| {r.R if r.R is not None else '–'} | {r.k or '–'} | {_fmt(r.recall_at_10)} "
                f"| {_fmt(r.ndcg_at_10)} | {_gap(r.ndcg_at_10, full and full.ndcg_at_10)} "
                f"| {_gap(r.ndcg_at_10, recent and recent.ndcg_at_10)} | {epochs} "
                f"| {'–' if r.wall_s is None else f'{r.wall_s:.0f}'} |"
            )
        popular = (baselines or {}).get(dataset)
        if popular:
            lines.append(
                f"| popularity | – | – | – | – | {_fmt(popular['recall@10'])} | {_fmt(popular['ndcg@10'])} "
                f"| {_gap(popular['ndcg@10'], full and full.ndcg_at_10)} "
                f"| {_gap(popular['ndcg@10'], recent and recent.ndcg_at_10)} | – | – |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(records: list[Record], path: Path, baselines: dict[str, dict[str, float]] | None = None) -> None:
    """Recall@10 and NDCG@10 against items read: the full-sequence curve, recent-only and PerSRec points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r.dataset for r in records)) or ["(none)"]
    fig, axes = plt.subplots(
        len(METRICS),
        len(datasets),
        figsize=(5.0 * len(datasets), 7.0),
        squeeze=False,
        constrained_layout=True,
    )
    for col, dataset in enumerate(datasets):
        done = [r for r in records if r.dataset == dataset and r.ndcg_at_10 is not None]
        for row, metric in enumerate(METRICS):
            ax = axes[row][col]
            value = (lambda r: r.recall_at_10) if metric == "recall@10" else (lambda r: r.ndcg_at_10)
            full = sorted((r for r in done if r.variant == "full"), key=lambda r: r.history_length)
            if full:
                ax.plot(
                    [r.history_length for r in full], [value(r) for r in full], "o-", label="full sequence"
                )
            for r in (r for r in done if r.variant == "recent"):
                ax.axhline(value(r), color="gray", linestyle="--", label=f"recent only (R={r.R})")
                ax.plot([r.history_length], [value(r)], "s", color="gray")
            popular = (baselines or {}).get(dataset)
            if popular:
                ax.axhline(popular[metric], color="black", linestyle=":", label="popularity")
            for r in sorted((r for r in done if r.variant == "persrec"), key=lambda r: r.k):
                ax.plot([r.history_length], [value(r)], "^", markersize=9, label=f"PerSRec k={r.k} (R={r.R})")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("history length (items)")
            ax.set_ylabel(f"test {metric}")
            ax.set_title(f"{dataset}: {metric}")
            ax.grid(alpha=0.3)
            if done:
                ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    records: list[Record],
    output: Path,
    command: str = "",
    notes: str = "",
    baselines: dict[str, dict[str, float]] | None = None,
) -> None:
    """``README.md`` (tables) and ``history_length.png`` (plot) in ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Accuracy against history length",
        "",
        "Full-sequence HSTU at several history lengths, recent-only HSTU over the last R items, and PerSRec HSTU "
        "(P history items compressed into k expert tokens, then R recent items; P + R = the full length). Same "
        "backbone and epoch budget for every run; each run's epoch is chosen on validation NDCG@10 and test "
        "metrics are shown. Gaps are relative to the full-history (largest length) and the recent-only run.",
        "",
    ]
    if command:
        parts += ["```", command, "```", ""]
    if notes:
        parts += [notes, ""]
    parts += [markdown_table(records, baselines), "![history length](history_length.png)", ""]
    atomic_write_text(output / "README.md", "\n".join(parts))
    plot(records, output / "history_length.png", baselines)


# ------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", default=["synthetic", "ml-1m"], choices=["synthetic", "ml-1m"]
    )
    parser.add_argument("--quick", action="store_true", help="tiny synthetic data, 1 epoch, two lengths")
    parser.add_argument("--json", type=Path, help="write one record per run to this JSON file")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--cache_dir", help="prepared-dataset cache passed to persrec train")
    parser.add_argument(
        "--deadline_minutes",
        type=float,
        help="stop (resumably) after this long; unfinished runs show 'not run'",
    )
    parser.add_argument(
        "--report_only", action="store_true", help="only rewrite the table and plot from finished runs"
    )
    args = parser.parse_args(argv)

    plans = dataset_plans(args.quick)
    runs_dir = args.output / "runs"
    deadline = time.time() + 60.0 * args.deadline_minutes if args.deadline_minutes else None
    started = time.time()
    runs = [run for name in args.datasets for run in plan_runs(plans[name])]
    stores = {name: open_dataset(plans[name], args.cache_dir) for name in args.datasets}
    for run in [] if args.report_only else runs:
        execute(run, plans[run.dataset], runs_dir, stores[run.dataset].path, deadline)

    records = [collect(run, runs_dir) for run in runs]
    budgets = "; ".join(
        f"{p.name}: epochs ≤ {p.epochs}, stopping_step {p.stopping_step}, batch {p.train_batch_size}"
        + "".join(f", {key} {value}" for key, value in p.extra.items())
        + (f" (generator: {_synthetic_summary(p.synthetic)})" if p.synthetic else "")
        for p in (plans[name] for name in args.datasets)
    )
    model = ", ".join(
        f"{k}={v}" for k, v in MODEL_ARGS.items() if k not in {"show_progress", "popularity_baseline"}
    )
    # The report shows the command that trains the runs, whichever invocation rendered it.
    shown = [token for token in (sys.argv[1:] if argv is None else argv) if token != "--report_only"]
    command = "python benchmarks/history_length.py " + " ".join(shown)
    baselines = {name: popularity_baseline(plans[name], stores[name]) for name in args.datasets}
    write_report(records, args.output, command, f"Model: HSTU, {model}. Budget: {budgets}.", baselines)
    print(markdown_table(records, baselines))
    print(f"wall time of this invocation: {time.time() - started:.0f} s; report in {args.output}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, [r.to_json() for r in records])
    return 0 if all(r.status == "done" for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Reproduce the generative-recommenders MovieLens-1M table (SASRec, HSTU, HSTU-large) with the `persrec` CLI.

Each model is trained by a `persrec train` subprocess, so the benchmark exercises the real command, as a named run
under `--output/runs/<model>`. Re-running the script skips runs that already wrote `results.json` and resumes
unfinished ones from their last checkpoint, so a killed benchmark loses at most one epoch. Each finished run's
table row is also kept in `--output/rows/<run>.json`, small enough to commit: runs (checkpoints, logs) are local
and may be deleted, and a row there is never trained again. The table shows every recorded row of the chosen
models (ours beside the published numbers), optionally also as JSON records.

    python benchmarks/reproduce_ml1m.py --quick                      # a 2-epoch smoke test
    python benchmarks/reproduce_ml1m.py --models sasrec hstu --threads 1
    python benchmarks/reproduce_ml1m.py --models hstu -- --optim_args.learning_rate 2e-3   # extra persrec flags
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from persrec.atomic import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "persrec" / "configs"
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200")
# persrec reports HR@k under its retrieval name recall@k (one target per user, so they coincide).
OUR_KEYS = {m: m.replace("hr@", "recall@") for m in METRICS}


@dataclass(frozen=True)
class Benchmark:
    name: str
    config: Path
    # generative-recommenders README, "MovieLens-1M (ML-1M)" table (verified there as of 04/15/2024).
    published: dict[str, float]


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark(
            "sasrec",
            CONFIGS / "ml1m-sasrec.yaml",
            dict(zip(METRICS, (0.2853, 0.1603, 0.5474, 0.2185, 0.7528, 0.2498), strict=True)),
        ),
        Benchmark(
            "hstu",
            CONFIGS / "ml1m-hstu.yaml",
            dict(zip(METRICS, (0.3097, 0.1720, 0.5754, 0.2307, 0.7716, 0.2606), strict=True)),
        ),
        Benchmark(
            "hstu-large",
            CONFIGS / "ml1m-hstu-large.yaml",
            dict(zip(METRICS, (0.3294, 0.1893, 0.5935, 0.2481, 0.7839, 0.2771), strict=True)),
        ),
    )
}
QUICK_EPOCHS = 2
# Extra `persrec train` flags and run-name suffix of each evaluation protocol. "persrec" selects the epoch on a
# validation item and reports the test item; "generative-recommenders" does as that code does: it trains on
# every item but the last and reports the best of its per-epoch evaluations of the last item.
PROTOCOLS = {
    "persrec": ([], ""),
    "generative-recommenders": (["--validation_split", "false"], "-gr-protocol"),
}


def persrec_command() -> list[str]:
    """The installed `persrec` entry point next to this interpreter (falls back to `python -m persrec.cli`)."""
    script = Path(sys.executable).with_name("persrec")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "persrec.cli"]


def thread_env(threads: int) -> dict[str, str]:
    """Environment that pins torch/BLAS to `threads`: the CPU is shared, and oversubscription is slower."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def latest_trainer_state(run_dir: Path) -> dict[str, Any] | None:
    """The trainer state of the run's newest complete checkpoint (epochs done, history), if any."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    state = root / pointer.read_text().strip() / "trainer_state.json"
    return json.loads(state.read_text()) if state.is_file() else None


def wall_file(run_dir: Path) -> Path:
    return run_dir / "benchmark_wall_seconds.json"


def recorded_wall_seconds(run_dir: Path) -> float | None:
    """Seconds the script's subprocesses spent on this run, summed over resumes."""
    path = wall_file(run_dir)
    return float(json.loads(path.read_text())["seconds"]) if path.is_file() else None


def add_wall_seconds(run_dir: Path, seconds: float) -> None:
    total = (recorded_wall_seconds(run_dir) or 0.0) + seconds
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(wall_file(run_dir), {"seconds": total})


def row_path(output: Path, run_name: str) -> Path:
    return output / "rows" / f"{run_name}.json"


def record_row(output: Path, row: dict[str, Any]) -> None:
    """Keep a finished run's row beside the table (temp file + rename: a reader never sees half a row)."""
    path = row_path(output, row["run"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, row)


def recorded_rows(output: Path, models: list[str]) -> list[dict[str, Any]]:
    """Every recorded row of `models`: by model, then our protocol before theirs, per-position negatives first."""
    rows = [json.loads(path.read_text()) for path in sorted((output / "rows").glob("*.json"))]
    rows = [row for row in rows if row["model"] in models]
    protocols = list(PROTOCOLS)
    return sorted(
        rows,
        key=lambda row: (
            models.index(row["model"]),
            protocols.index(row.get("protocol", "persrec")),
            row.get("negatives") != "per position",
            row["run"],
        ),
    )


def train(
    benchmark: Benchmark, run_name: str, runs: Path, logs: Path, args: argparse.Namespace, extra: list[str]
) -> None:
    """Train (or resume) one run unless it already finished."""
    run_dir = runs / run_name
    if (run_dir / "results.json").is_file():
        print(f"[{run_name}] finished earlier: {run_dir / 'results.json'}", flush=True)
        return
    command = [
        *persrec_command(),
        "train",
        "--config_file",
        str(benchmark.config),
        "--checkpoint_dir",
        str(runs),
        "--run_name",
        run_name,
    ]
    if args.epochs is not None:
        command += ["--epochs", str(args.epochs)]
    command += extra
    if latest_trainer_state(run_dir) is not None:
        command += ["--resume", "true"]
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{run_name}.log"
    print(f"[{run_name}] {shlex.join(command)}\n[{run_name}] log: {log_path}", flush=True)
    started = time.perf_counter()
    try:
        with log_path.open("a") as log:
            log.write(f"\n$ {shlex.join(command)}\n")
            log.flush()
            # On an exception (Ctrl-C, or SIGTERM through `stop_on_sigterm`) `call` kills the child first.
            code = subprocess.call(
                command, stdout=log, stderr=subprocess.STDOUT, env=thread_env(args.threads)
            )
    finally:  # an interrupted stretch still counts towards the run's wall time
        add_wall_seconds(run_dir, time.perf_counter() - started)
    if code != 0:
        raise SystemExit(f"[{run_name}] persrec train exited with {code}; see {log_path}")


def collect(benchmark: Benchmark, run_dir: Path, protocol: str = "persrec") -> dict[str, Any] | None:
    """One table row from a finished run: our test metrics, the published ones, epochs and wall time."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    state = latest_trainer_state(run_dir) or {}
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    )
    wall = recorded_wall_seconds(run_dir)
    if wall is None:  # trained outside this script: from the run's first file to its results
        wall = path.stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
    row: dict[str, Any] = {
        "model": benchmark.name,
        "run": run_dir.name,
        "protocol": protocol,
        "negatives": "per position" if config.get("negatives_per_position") else "per sequence",
    }
    row.update({m: results["test"][OUR_KEYS[m]] for m in METRICS})
    row.update({f"published {m}": benchmark.published[m] for m in METRICS})
    row.update(
        {
            "valid ndcg@10": results["valid"]["ndcg@10"],
            "best epoch": results.get("best_epoch"),
            "epochs trained": state.get("epoch"),
            "max epochs": config.get("epochs"),
            "wall seconds": round(wall, 1),
            "popularity": {
                m: results.get("test (popularity baseline)", {}).get(OUR_KEYS[m]) for m in METRICS
            },
        }
    )
    return row


def markdown(rows: list[dict[str, Any]], command: str, notes: list[str]) -> str:
    """Our test HR/NDCG beside the published numbers (relative difference in brackets)."""
    header = "| model | " + " | ".join(m.upper().replace("HR", "HR").replace("NDCG", "NDCG") for m in METRICS)
    lines = [
        "# MovieLens-1M: persrec vs. generative-recommenders",
        "",
        "Test split (each user's last item), full ranking over all items with the user's earlier items removed.",
        "`ours` = persrec, `paper` = the generative-recommenders README table. Relative difference in brackets.",
        "",
        header + " | best epoch / trained / max | wall |",
        "|---|" + "---:|" * len(METRICS) + "---:|---:|",
    ]
    for index, row in enumerate(rows):
        ours = []
        for m in METRICS:
            value, ref = row[m], row[f"published {m}"]
            ours.append(f"{value:.4f} ({(value - ref) / ref:+.1%})")
        wall = f"{row['wall seconds'] / 60:.0f} min"
        label = "ours" if row.get("protocol", "persrec") == "persrec" else "ours, their protocol"
        if row.get("negatives") == "per sequence":
            label += ", per-sequence negatives"
        lines.append(
            f"| {row['model']} ({label}) | "
            + " | ".join(ours)
            + f" | {row['best epoch']} / {row['epochs trained']} / {row['max epochs']}"
            f" | {wall} |"
        )
        if index + 1 == len(rows) or rows[index + 1]["model"] != row["model"]:
            paper = " | ".join(f"{row[f'published {m}']:.4f}" for m in METRICS)
            lines.append(f"| {row['model']} (paper) | {paper} | | |")
    if rows and all(v is not None for v in rows[0]["popularity"].values()):
        pop = " | ".join(f"{rows[0]['popularity'][m]:.4f}" for m in METRICS)
        lines.append(f"| most popular (ours) | {pop} | | |")
    lines += ["", "Command:", "", "```", command, "```", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def protocol_notes(args: argparse.Namespace, extra: list[str], rows: list[dict[str, Any]]) -> list[str]:
    notes = [
        "Early stopping on validation NDCG@10 (second-to-last item), stopping_step 10, at most the epochs in the "
        "table's `max` column (the configs say 101, capped here to fit the CPU budget); the best "
        "validation epoch's weights are tested. generative-recommenders has no validation split: it trains "
        "on every item but the last, evaluates the last item after each epoch for 101 epochs.",
        "Here training targets exclude the validation item, one fewer target per user than theirs.",
        "Seen items: persrec removes the user's whole earlier history from the ranking, theirs removes the "
        "items of the (200-item) input window; identical for users with at most 200 earlier items.",
        "Negatives: 128 uniform ids drawn for every position (negatives_per_position), as their "
        "LocalNegativesSampler does; no gradient clipping, as theirs.",
        *(
            [
                "`per-sequence negatives` rows: an earlier version of the configs, 128 ids drawn per sequence and "
                "shared by its positions, gradient-norm clipping at 1.0."
            ]
            if any(row.get("negatives") == "per sequence" for row in rows)
            else []
        ),
        "Data: the 5-core ML-1M copy (3,416 items, 999,611 ratings); theirs keeps all 3,706 items "
        "(0.06% more interactions).",
        f"CPU only, {args.threads} torch thread(s) per run; wall time includes validation after every "
        "epoch and depends on what else shared the machine.",
    ]
    if any(row.get("protocol") == "generative-recommenders" for row in rows):
        notes.append(
            "`their protocol` rows: `--validation_split false`, the second-to-last item is a training target and "
            "the epoch is selected on the test item, as generative-recommenders does (it reports the best of "
            "its per-epoch test evaluations). Optimistic by construction; shown only to compare like with like."
        )
    notes += [f"`{row['run']}`: {row['note']}." for row in rows if row.get("note")]
    notes += args.note
    if extra:
        notes.append(f"Extra persrec flags: `{shlex.join(extra)}`.")
    return notes


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(BENCHMARKS), default=["sasrec", "hstu"])
    parser.add_argument("--output", type=Path, default=None, help="default benchmarks/results/ml1m")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs per model (smoke test)")
    parser.add_argument(
        "--protocols",
        nargs="+",
        choices=sorted(PROTOCOLS),
        default=["persrec"],
        help="evaluation protocols to run (default persrec: validation-selected epoch, test reported)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--epochs", type=int, default=None, help="cap on epochs (default: the config's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON records")
    parser.add_argument("--table", type=Path, default=None, help="markdown table (default OUTPUT/README.md)")
    parser.add_argument("--note", action="append", default=[], help="extra line for the table's notes")
    parser.add_argument("extra", nargs="*", help="after --: extra `persrec train` flags for every run")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = QUICK_EPOCHS
    if args.output is None:
        name = "ml1m-quick" if args.quick else "ml1m"
        args.output = ROOT / "benchmarks" / "results" / name
    return args, list(args.extra)


def stop_on_sigterm(signum: int, frame: object) -> None:
    """`kill` raises SystemExit, so the training child is stopped and the wall time recorded."""
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    runs, logs = args.output / "runs", args.output / "logs"
    for name in args.models:
        for protocol in args.protocols:
            benchmark = BENCHMARKS[name]
            flags, suffix = PROTOCOLS[protocol]
            run_name = name + suffix
            if row_path(args.output, run_name).is_file():
                print(f"[{run_name}] recorded earlier: {row_path(args.output, run_name)}", flush=True)
                continue
            train(benchmark, run_name, runs, logs, args, extra + flags)
            row = collect(benchmark, runs / run_name, protocol)
            if row is None:
                continue
            record_row(args.output, row)
            print(
                f"[{run_name}] test "
                + ", ".join(f"{m} {row[m]:.4f} (paper {row[f'published {m}']:.4f})" for m in METRICS[:2])
            )
    rows = recorded_rows(args.output, args.models)
    shown = [sys.argv[0] if argv is None else "benchmarks/reproduce_ml1m.py"]
    shown += sys.argv[1:] if argv is None else argv
    command = "python " + shlex.join(shown)
    table = args.table or args.output / "README.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table, markdown(rows, command, protocol_notes(args, extra, rows)))
    print(f"table: {table}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, rows)
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    raise SystemExit(main())

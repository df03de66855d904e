"""The Hugging Face backbones on real data, offline: LLaMA-ID and HLLM (frozen MiniLM item model), with and without
personalized experts, beside ID-based HSTU on the same split and the same epoch budget.

Datasets: MovieLens-1M (titles and genres from movies.dat) and Amazon 2014 Toys and Games (product titles), both
read from the shared data folder ($PERSREC_SHARED_DATA, default ../shared/data). Amazon-toy is prepared from its
CSVs with `persrec convert` + `persrec prepare --items` on first use. Every run is a plain `persrec train` with a
config from persrec/configs/ (plus `--epochs`), so any row can be re-run by hand; finished runs are skipped.

    python benchmarks/hf_demo.py --epochs 6 --datasets amazon-toy ml-1m
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "persrec" / "configs"
OUTPUT = REPO / "benchmarks" / "results" / "hf_demo"
ROWS = {
    "amazon-toy": [
        ("HSTU (item IDs)", ["amazon-toy-hstu.yaml"]),
        ("LLaMA-ID", ["amazon-toy-llama-id.yaml"]),
        ("LLaMA-ID + experts (P=40, R=10, k=4)", ["amazon-toy-llama-id.yaml", "experts-P40-R10-k4.yaml"]),
        ("HLLM, frozen MiniLM", ["amazon-toy-hllm-minilm.yaml"]),
        (
            "HLLM, frozen MiniLM + experts (P=40, R=10, k=4)",
            ["amazon-toy-hllm-minilm.yaml", "experts-P40-R10-k4.yaml"],
        ),
    ],
    "ml-1m": [
        ("HSTU (item IDs)", ["ml1m-hstu.yaml"]),
        ("LLaMA-ID", ["ml1m-llama-id.yaml"]),
        ("LLaMA-ID + experts (P=160, R=40, k=4)", ["ml1m-llama-id.yaml", "experts-P160-R40-k4.yaml"]),
        ("HLLM, frozen MiniLM", ["ml1m-hllm-minilm.yaml"]),
        (
            "HLLM, frozen MiniLM + experts (P=160, R=40, k=4)",
            ["ml1m-hllm-minilm.yaml", "experts-P160-R40-k4.yaml"],
        ),
    ],
}
METRICS = ("hr@10", "ndcg@10", "hr@50", "mrr")


def shared_data() -> Path:
    return Path(os.environ.get("PERSREC_SHARED_DATA", REPO.parent / "shared" / "data"))


def persrec(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("persrec")
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", "persrec.cli", *args]


def amazon_toy(work: Path) -> Path:
    """The prepared Amazon-toy dataset (built once from the shared CSVs)."""
    prepared = work / "amazon-toy"
    if (prepared / "manifest.json").is_file():
        return prepared
    source = shared_data() / "amazon-text" / "amazon2014-toy"
    for name in ("interactions", "items"):
        target = work / f"toy-{name}.parquet"
        if not target.is_file():
            subprocess.run(persrec("convert", str(source / f"{name}.csv.gz"), str(target)), check=True)
    subprocess.run(
        persrec(
            "prepare",
            "--input",
            str(work / "toy-interactions.parquet"),
            "--items",
            str(work / "toy-items.parquet"),
            "--output",
            str(prepared),
        ),
        check=True,
    )
    return prepared


def run_name(dataset: str, label: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in label.lower())
    return f"{dataset}-" + "-".join(part for part in keep.split("-") if part)


def run_one(dataset: str, label: str, configs: list[str], args: argparse.Namespace) -> dict:
    name = run_name(dataset, label)
    run_dir = args.work / "runs" / name
    results = run_dir / "results.json"
    if not results.is_file():
        command = ["train"]
        for config in configs:
            command += ["--config_file", str(CONFIGS / config)]
        command += ["--epochs", str(args.epochs), "--eval_interval", str(args.eval_interval)]
        command += [
            "--checkpoint_dir",
            str(args.work / "runs"),
            "--run_name",
            name,
            "--show_progress",
            "false",
        ]
        command += ["--cache_dir", str(args.work / "cache")]
        if dataset == "amazon-toy":
            command += ["--dataset", str(amazon_toy(args.work))]
        else:
            command += ["--data_path", str(shared_data())]
        if (run_dir / "checkpoints").is_dir():
            command = ["train", "--resume", str(run_dir)]
        start = time.perf_counter()
        subprocess.run(
            persrec(*command), check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        )
        (run_dir / "demo_wall_seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    summary = json.loads(results.read_text())
    wall = run_dir / "demo_wall_seconds.json"
    test = summary["test"]
    return {
        "dataset": dataset,
        "model": label,
        "configs": configs,
        "epochs_trained": summary.get("epochs_trained"),
        "best_epoch": summary.get("best_epoch"),
        "wall_seconds": json.loads(wall.read_text())["seconds"]
        if wall.is_file()
        else summary["wall_seconds"],
        "parameters": summary.get("parameters"),
        **{metric: test.get(metric) for metric in METRICS},
        "popularity_ndcg@10": summary.get("test (popularity baseline)", {}).get("ndcg@10"),
        "users": test.get("count"),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | model | epochs (best) | " + " | ".join(METRICS) + " | wall |",
        "|---|---|---|" + "---:|" * len(METRICS) + "---:|",
    ]
    for row in rows:
        values = " | ".join(f"{row[m]:.4f}" if row[m] is not None else "-" for m in METRICS)
        wall = f"{row['wall_seconds'] / 60:.0f} min" if row["wall_seconds"] else "-"
        lines.append(
            f"| {row['dataset']} | {row['model']} | {row['epochs_trained']} ({row['best_epoch']}) | {values} | {wall} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument(
        "--epochs", type=int, default=6, help="epoch budget of every run (early stopping inside)"
    )
    parser.add_argument("--eval_interval", type=int, default=2, help="validate every this many epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--work", type=Path, default=Path("demo-work"), help="runs, caches, prepared Amazon-toy"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset in args.datasets:
        for label, configs in ROWS[dataset]:
            rows.append(run_one(dataset, label, configs, args))
            args.output.mkdir(parents=True, exist_ok=True)
            (args.output / "hf_demo.json").write_text(json.dumps(rows, indent=1))
            print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Item-embedding throughput of the HLLM item LLM: length-sorted vs naive padded batches, items/s.

Real product titles (Amazon 2014 Toys and Games, `items.csv.gz` of ../shared/data/amazon-text) are turned into
HLLM item texts (the reference prompt, then `title: ...`) and embedded by `ItemTextEncoder.embed_all` with

- all-MiniLM-L6-v2 (BERT encoder, mean pooling, no item token), and
- SmolLM2-135M-Instruct (Llama decoder, one item token), from the fp32 directory `persrec models convert` writes
  (made under benchmarks/results/tmp/ when --smollm2 is not given),

at 1 and 2 threads. For each (model, threads) both batchings run alternately on the same encoder and the same
items (best of --repeats runs each): `padded` (catalogue order, each batch padded to its longest item: the naive
baseline) and `sorted` (items ordered by token count first). The ratio sorted / padded is taken within that pair,
and the two outputs are compared: they agree to float32 rounding, which on SmolLM2 (30 layers, a few hidden
dimensions near 50) is a few 1e-5 of the largest embedding value. Each row also reports the share of token slots
that were padding, the process CPU time over wall time x threads (how much of the asked-for CPU it got) and the
load average, since the machine is shared with other work.

    python benchmarks/item_embedding_throughput.py
    python benchmarks/item_embedding_throughput.py --quick --json /tmp/quick.json
    python benchmarks/item_embedding_throughput.py --padding-only    # padding over the whole catalogue
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persrec.atomic import atomic_write_json, atomic_write_text
from persrec.hf.catalog import MARKER_FILE, convert_local_model, get_local_model
from persrec.hf.item_encoder import ItemEncoderOptions, ItemTextEncoder
from persrec.hf.item_text import DEFAULT_ITEM_PROMPT, ItemTexts

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "item_embedding"
SCRATCH = ROOT / "results" / "tmp"
SHARED = Path(os.environ.get("PERSREC_SHARED_DATA", ROOT.parent.parent / "shared" / "data"))
DEFAULT_TITLES = SHARED / "amazon-text" / "amazon2014-toy" / "items.csv.gz"


def read_titles(path: Path, count: int, seed: int = 0) -> list[str]:
    """`count` titles drawn at random (fixed seed) from an `item_id,title` CSV (gzipped or not)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        titles = [row["title"] for row in csv.DictReader(handle) if row.get("title")]
    random.Random(seed).shuffle(titles)
    return titles[:count]


def item_texts(titles: list[str], prompt: str = DEFAULT_ITEM_PROMPT) -> ItemTexts:
    return ItemTexts(("", *(f"{prompt}title: {t}" for t in titles)), prompt, ("title",), Path("titles"))


def _timed_embed_all(encoder: ItemTextEncoder, batch: int, length_sorted: bool) -> tuple[torch.Tensor, dict]:
    encoder.options = dataclasses.replace(encoder.options, length_sorted=length_sorted)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    table = encoder.embed_all(batch)
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    stats = encoder.last_stats
    threads = torch.get_num_threads()
    return table, {
        "items_per_s": stats.items / wall,
        "seconds": wall,
        "padding_fraction": stats.padding_fraction,
        "token_slots": stats.slots,
        "real_tokens": stats.real_tokens,
        "cpu_share": cpu / (wall * threads),
    }


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda run: run["items_per_s"])


def measure(
    model: str,
    model_dir: Path,
    texts: ItemTexts,
    item_tokens: int,
    threads: int,
    batch: int,
    max_len: int,
    repeats: int = 2,
) -> dict[str, Any]:
    """One (model, threads) pair: padded and sorted alternately on the same encoder (best of `repeats` each,
    so a burst of someone else's load does not pick the winner), with their agreement."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    options = ItemEncoderOptions(max_text_length=max_len, item_emb_token_n=item_tokens, batch_size=batch)
    encoder = ItemTextEncoder(model_dir, texts, options)
    encoder.llm.requires_grad_(False)
    encoder.embed(torch.arange(1, min(9, texts.num_items + 1)))  # warm-up: first-call allocations
    load_start = os.getloadavg()[0]
    naive_runs, fast_runs = [], []
    for _ in range(repeats):
        padded, naive = _timed_embed_all(encoder, batch, length_sorted=False)
        ordered, fast = _timed_embed_all(encoder, batch, length_sorted=True)
        naive_runs.append(naive)
        fast_runs.append(fast)
    naive, fast = _best(naive_runs), _best(fast_runs)
    lengths = encoder.text_lengths
    return {
        "model": model,
        "threads": threads,
        "items": texts.num_items,
        "batch": batch,
        "repeats": repeats,
        "item_tokens": item_tokens,
        "pooling": options.pooling,
        "max_text_length": max_len,
        "tokens_p50": float(np.median(lengths)),
        "tokens_p90": float(np.percentile(lengths, 90)),
        "tokens_max": int(lengths.max()),
        "padded": naive,
        "sorted": fast,
        "speedup": fast["items_per_s"] / naive["items_per_s"],
        "max_abs_diff": float((padded - ordered).abs().max()),
        "max_rel_diff": float((padded - ordered).abs().max() / ordered.abs().max()),
        "load_1m_start": load_start,
        "load_1m_end": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def catalogue_padding(
    model: str, model_dir: Path, titles: list[str], item_tokens: int, batch: int, max_len: int
) -> dict[str, Any]:
    """Padding share of `embed_all` over a whole catalogue, padded vs sorted: counted from the token lengths
    alone (the tokenizer runs, the model does not), so it covers every item where timing covers a sample."""
    from persrec.hf.item_encoder import padded_slots, plan_batches
    from persrec.hf.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir, option=model)
    texts = item_texts(titles)
    ids = tokenizer(list(texts.texts[1:]), truncation=True, max_length=max_len)["input_ids"]
    lengths = np.array([len(row) for row in ids]) + item_tokens
    row: dict[str, Any] = {"model": model, "items": len(titles), "batch": batch}
    for name, ordered in (("padded", False), ("sorted", True)):
        slots = padded_slots(lengths, plan_batches(lengths, batch, ordered))
        row[f"{name}_padding_fraction"] = 1 - int(lengths.sum()) / slots
        row[f"{name}_token_slots"] = slots
    return row


def smollm2_dir(given: Path | None) -> Path:
    """The converted SmolLM2 directory: --smollm2, else one made (once) under benchmarks/results/tmp/."""
    if given is not None:
        return given
    target = SCRATCH / "smollm2"
    if not (target / MARKER_FILE).is_file():
        result = convert_local_model(
            get_local_model("smollm2-135m-instruct"), target, overwrite=target.exists()
        )
        print(f"converted SmolLM2 to {target} in {result.seconds:.1f} s", flush=True)
    return target


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | threads | items | tokens p50 / p90 / max | padded items/s | padding | sorted items/s | padding"
        " | sorted / padded | max abs diff (rel.) | cpu share | load 1m |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, s = r["padded"], r["sorted"]
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['items']} | {r['tokens_p50']:.0f} / {r['tokens_p90']:.0f} / "
            f"{r['tokens_max']} | {p['items_per_s']:.1f} | {100 * p['padding_fraction']:.0f}% | "
            f"{s['items_per_s']:.1f} | {100 * s['padding_fraction']:.0f}% | {r['speedup']:.2f}x | "
            f"{r['max_abs_diff']:.1e} ({r['max_rel_diff']:.0e}) | {p['cpu_share']:.2f} / {s['cpu_share']:.2f} | "
            f"{r['load_1m_start']:.1f}-{r['load_1m_end']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--titles", type=Path, default=DEFAULT_TITLES, help="item_id,title CSV (.gz)")
    p.add_argument("--minilm", type=Path, help="MiniLM directory (default: the installed package)")
    p.add_argument("--smollm2", type=Path, help="converted SmolLM2 directory (default: converted once)")
    p.add_argument("--minilm-items", type=int, default=1000)
    p.add_argument("--smollm2-items", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="runs of each batching; the best is reported")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-text-length", type=int, default=256, help="the reference's MAX_TEXT_LENGTH")
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    p.add_argument("--name", default="amazon2014-toy", help="results file stem")
    p.add_argument("--quick", action="store_true", help="a small sample, 1 thread, 1 run (a smoke check)")
    p.add_argument("--json", type=Path, help="write the results JSON here instead of benchmarks/results/")
    p.add_argument(
        "--padding-only",
        action="store_true",
        help="only count the padding over the whole catalogue (no timing)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.minilm_items, args.smollm2_items, args.threads, args.repeats = 200, 32, [1], 1
    if not args.titles.is_file():
        print(f"no titles at {args.titles}; set PERSREC_SHARED_DATA or pass --titles", file=sys.stderr)
        return 2
    if args.padding_only:
        return padding_report(args)
    rows = []
    for model in args.models:
        count = args.minilm_items if model == "minilm" else args.smollm2_items
        texts = item_texts(read_titles(args.titles, count))
        if model == "minilm":
            directory, tokens = args.minilm or get_local_model("all-minilm-l6-v2").path, 0
        else:
            directory, tokens = smollm2_dir(args.smollm2), 1
        for threads in args.threads:
            row = measure(
                model, directory, texts, tokens, threads, args.batch, args.max_text_length, args.repeats
            )
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    meta = {"torch": torch.__version__, "cpus": os.cpu_count(), "titles": str(args.titles), "rows": rows}
    if args.json is not None:
        atomic_write_json(args.json, meta)
    else:
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RESULTS / f"{args.name}.json", meta)
        atomic_write_text(RESULTS / f"{args.name}.md", table(rows) + "\n")
    print(table(rows))
    return 0


def padding_report(args: argparse.Namespace) -> int:
    titles = read_titles(args.titles, 10**9)
    rows = []
    for model in args.models:
        if model == "minilm":
            directory, tokens = args.minilm or get_local_model("all-minilm-l6-v2").path, 0
        else:
            directory, tokens = smollm2_dir(args.smollm2), 1
        rows.append(catalogue_padding(model, directory, titles, tokens, args.batch, args.max_text_length))
    lines = ["| model | items | batch | padding, padded | padding, sorted |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r['items']} | {r['batch']} | {100 * r['padded_padding_fraction']:.1f}% | "
        f"{100 * r['sorted_padding_fraction']:.1f}% |"
        for r in rows
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{args.name}-padding.json", {"titles": str(args.titles), "rows": rows})
    atomic_write_text(RESULTS / f"{args.name}-padding.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

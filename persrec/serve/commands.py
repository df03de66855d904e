"""The serving commands of the CLI: `persrec recommend`, `persrec export` and `persrec serve`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from persrec.atomic import atomic_path
from persrec.config import ConfigError


@dataclass
class UserRows:
    users: list[Any]
    histories: list[list[Any]]
    timestamps: list[list[int]] | None


def read_users(path: Path, user_col: str, item_col: str, time_col: str) -> UserRows:
    """Histories from parquet: one row per user with a list column of items (and optionally of times), or one
    row per interaction (ordered by time within each user, file order breaking ties)."""
    if not path.is_file():
        raise ConfigError(f"--input {path}: no such file; expected a parquet file of user histories")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise ConfigError(f"--input {path}: not a readable parquet file ({error})") from error
    for column in (user_col, item_col):
        if column not in table.column_names:
            raise ConfigError(
                f"--input {path}: no column {column!r} (columns: {', '.join(table.column_names)}); "
                "set --user_col / --item_col"
            )
    has_time = time_col in table.column_names
    if pa.types.is_list(table.schema.field(item_col).type) or pa.types.is_large_list(
        table.schema.field(item_col).type
    ):
        times = table.column(time_col).to_pylist() if has_time else None
        return UserRows(table.column(user_col).to_pylist(), table.column(item_col).to_pylist(), times)
    table = table.append_column("__row", pa.array(np.arange(table.num_rows)))
    keys = (
        [(user_col, "ascending")] + ([(time_col, "ascending")] if has_time else []) + [("__row", "ascending")]
    )
    table = table.take(pc.sort_indices(table, sort_keys=keys))
    users = table.column(user_col).to_pylist()
    items = table.column(item_col).to_pylist()
    stamps = table.column(time_col).to_pylist() if has_time else None
    out = UserRows([], [], [] if has_time else None)
    for index, user in enumerate(users):
        if not out.users or out.users[-1] != user:
            out.users.append(user)
            out.histories.append([])
            if out.timestamps is not None:
                out.timestamps.append([])
        out.histories[-1].append(items[index])
        if out.timestamps is not None:
            out.timestamps[-1].append(int(stamps[index]))
    return out


def _batches(count: int, size: int) -> Iterator[range]:
    for start in range(0, count, size):
        yield range(start, min(count, start + size))


def _split_ids(text: str, option: str) -> list[str]:
    values = [value.strip() for value in text.split(",") if value.strip()]
    if not values:
        raise ConfigError(f"{option}: expected comma-separated item ids, e.g. 12,7,33")
    return values


def _timestamps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(value) for value in _split_ids(text, "--timestamps")]
    except ValueError as error:
        raise ConfigError(
            f"--timestamps: expected comma-separated integers (seconds), got {text!r}"
        ) from error


def _recommend_rows(rec: Any, rows: UserRows, picks: list[int], args: Any, retriever: Any) -> list[dict]:
    """Recommendations for the users `picks` of `rows`, one output row each (in `picks` order)."""
    from tqdm import tqdm

    out = []
    rank = int(os.environ.get("RANK", "0"))
    bar = tqdm(total=len(picks), unit="user", disable=not args.progress or rank != 0, file=sys.stderr)
    for chunk in _batches(len(picks), args.batch_size):
        indices = [picks[i] for i in chunk]
        histories = [rows.histories[i] for i in indices]
        times = None if rows.timestamps is None else [rows.timestamps[i] for i in indices]
        users = [rows.users[i] for i in indices]
        try:
            if retriever is None:
                results = rec.recommend_batch(histories, args.k, times, not args.include_seen, users)
            else:
                results = _faiss_batch(rec, retriever, histories, times, users, args)
        except ValueError as error:
            raise ConfigError(f"--input: {error}") from error
        for index, result in zip(indices, results, strict=True):
            out.append(
                {
                    "position": index,
                    "user_id": rows.users[index],
                    "item_ids": result.items,
                    "scores": result.scores,
                    "unknown_items": result.unknown_count,
                }
            )
        bar.update(len(chunk))
    bar.close()
    return out


def _faiss_batch(
    rec: Any, retriever: Any, histories: list, times: list | None, users: list, args: Any
) -> list:
    from persrec.serve.recommender_api import Recommendation

    encoded = [rec.encode(h, None if times is None else times[i]) for i, h in enumerate(histories)]
    known = [i for i, e in enumerate(encoded) if len(e.items)]
    results = [Recommendation([], [], e.unknown_count, e.unknown_examples) for e in encoded]
    if known:
        vectors = rec.user_embeddings([encoded[i] for i in known], [rec.user_index(users[i]) for i in known])
        exclude = None if args.include_seen else [np.unique(encoded[i].items) for i in known]
        for i, ranked in zip(known, retriever.search(vectors, args.k, exclude), strict=True):
            results[i] = rec.result(encoded[i], ranked, rec.staleness(len(encoded[i].items)))
    return results


def _output_table(rows: list[dict], id_type: pa.DataType | None) -> pa.Table:
    rows = sorted(rows, key=lambda row: row["position"])
    return pa.table(
        {
            "user_id": pa.array([row["user_id"] for row in rows], id_type),
            "item_ids": [row["item_ids"] for row in rows],
            "scores": pa.array([row["scores"] for row in rows], pa.list_(pa.float32())),
            "unknown_items": pa.array([row["unknown_items"] for row in rows], pa.int32()),
        }
    )


def recommend_file(rec: Any, args: Any, retriever: Any) -> None:
    """--input -> --output in batches; under torchrun each rank scores every world_size-th user and rank 0
    joins the parts (written beside the output) into the output, atomically."""
    rows = read_users(args.input, args.user_col, args.item_col, args.time_col)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    id_type = pq.read_schema(args.input).field(args.user_col).type
    picks = list(range(rank, len(rows.users), world))
    table = _output_table(_recommend_rows(rec, rows, picks, args, retriever), id_type)
    if world == 1:
        with atomic_path(args.output) as tmp:
            pq.write_table(table, tmp)
        print(f"wrote {args.output} ({table.num_rows} users)")
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    part = args.output.with_name(f".{args.output.name}.part-{rank}-of-{world}")
    with atomic_path(part) as tmp:
        pq.write_table(table.append_column("position", pa.array(picks, pa.int64())), tmp)
    dist.barrier()
    if rank == 0:
        parts = [args.output.with_name(f".{args.output.name}.part-{r}-of-{world}") for r in range(world)]
        joined = pa.concat_tables([pq.read_table(p) for p in parts])
        joined = joined.take(pc.sort_indices(joined, [("position", "ascending")])).drop_columns(["position"])
        with atomic_path(args.output) as tmp:
            pq.write_table(joined, tmp)
        for p in parts:
            p.unlink()
        print(f"wrote {args.output} ({joined.num_rows} users, {world} processes)")
    dist.barrier()
    dist.destroy_process_group()


def cmd_recommend(argv: list[str]) -> int:
    from persrec.cli import CommandParser

    parser = CommandParser(
        prog="persrec recommend",
        description="Recommend items for one history (JSON on stdout) or for every user of a parquet file.",
        epilog="examples:\n  persrec recommend runs/ml --history 12,7,33 --k 10\n"
        "  persrec recommend runs/ml --input users.parquet --output recs.parquet\n"
        "  torchrun --nproc_per_node 4 -m persrec.cli recommend runs/ml --input u.parquet --output r.parquet",
    )
    parser.add_argument("run_dir", type=Path, help="run directory or its best/ directory")
    parser.add_argument("--history", help="comma-separated item ids, oldest first")
    parser.add_argument("--timestamps", help="comma-separated interaction times, one per history item")
    parser.add_argument("--user", help="user id (models with per-user expert tokens)")
    parser.add_argument(
        "--input", type=Path, help="parquet of histories (list column, or one row per interaction)"
    )
    parser.add_argument(
        "--output", type=Path, help="parquet to write: user_id, item_ids, scores, unknown_items"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--include_seen", action="store_true", help="also recommend items of the history")
    parser.add_argument("--refresh_every", type=int, default=1, help="expert models: the refresh policy's N")
    parser.add_argument("--retrieval", choices=("exact", "faiss"), default="exact")
    parser.add_argument(
        "--index", type=Path, help="--retrieval faiss: the export directory or its items.faiss"
    )
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--user_col", default="user_id")
    parser.add_argument("--item_col", default="item_id")
    parser.add_argument("--time_col", default="timestamp")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    if (args.history is None) == (args.input is None):
        raise ConfigError("recommend: give either --history (one user) or --input with --output (many users)")
    if args.input is not None and args.output is None:
        raise ConfigError("--output: required with --input (the parquet file to write)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size: expected a positive integer, got {args.batch_size}")
    if args.retrieval == "faiss" and args.index is None:
        raise ConfigError("--index: required with --retrieval faiss (the directory persrec export wrote)")
    from persrec.serve.recommender_api import load_recommender

    rec = load_recommender(args.run_dir, device=args.device, refresh_every=args.refresh_every)
    if not 1 <= args.k <= rec.num_items:
        raise ConfigError(
            f"--k: expected an integer in [1, {rec.num_items}] (the catalogue size), got {args.k}"
        )
    retriever = None
    if args.retrieval == "faiss":
        from persrec.serve.export import FaissRetriever

        retriever = FaissRetriever.open(args.index, rec.fingerprint)
    if args.input is not None:
        recommend_file(rec, args, retriever)
        return 0
    rows = UserRows([args.user], [_split_ids(args.history, "--history")], None)
    stamps = _timestamps(args.timestamps)
    rows.timestamps = None if stamps is None else [stamps]
    try:
        args.progress = False
        result = _recommend_rows(rec, rows, [0], args, retriever)[0]
        encoded = rec.encode(rows.histories[0], stamps)
    except ValueError as error:
        raise ConfigError(f"--history: {error}") from error
    print(
        json.dumps(
            {
                "items": result["item_ids"],
                "scores": [round(s, 6) for s in result["scores"]],
                "unknown_items": {"count": encoded.unknown_count, "examples": encoded.unknown_examples},
            }
        )
    )
    return 0


def cmd_export(argv: list[str]) -> int:
    from persrec.cli import CommandParser

    parser = CommandParser(
        prog="persrec export",
        description="Write items.parquet (and users.parquet) of L2-normalised embeddings: a user vector's dot "
        "product with an item vector is the model's score.",
    )
    parser.add_argument("run_dir", type=Path, help="run directory or its best/ directory")
    parser.add_argument("--output", type=Path, required=True, help="directory to write into (created)")
    parser.add_argument("--users", type=Path, help="parquet of user histories -> users.parquet")
    parser.add_argument("--index", choices=("none", "faiss"), default="none", help="also build an ANN index")
    parser.add_argument("--recall_k", type=int, default=10, help="k of the index's measured recall@k")
    parser.add_argument("--overwrite", action="store_true", help="replace files an earlier export wrote")
    parser.add_argument("--user_col", default="user_id")
    parser.add_argument("--item_col", default="item_id")
    parser.add_argument("--time_col", default="timestamp")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from persrec.serve.export import ITEMS_FILE, USERS_FILE, build_faiss_index, embedding_table, write_parquet
    from persrec.serve.recommender_api import load_recommender

    if args.output.exists() and not args.output.is_dir():
        raise ConfigError(f"--output {args.output}: exists and is not a directory")
    if (args.output / ITEMS_FILE).exists() and not args.overwrite:
        raise ConfigError(
            f"--output {args.output}: already holds {ITEMS_FILE}; pass --overwrite to replace it"
        )
    rec = load_recommender(args.run_dir, device=args.device)
    rows = read_users(args.users, args.user_col, args.item_col, args.time_col) if args.users else None
    args.output.mkdir(parents=True, exist_ok=True)
    ids, items = rec.item_embeddings()
    write_parquet(embedding_table(ids, items, "item_id"), args.output / ITEMS_FILE)
    print(f"wrote {args.output / ITEMS_FILE} ({len(ids)} items, dim {items.shape[1]})")
    queries = None
    if rows is not None:
        vectors, users = [], []
        for chunk in _batches(len(rows.users), args.batch_size):
            encoded = [
                rec.encode(rows.histories[i], None if rows.timestamps is None else rows.timestamps[i])
                for i in chunk
            ]
            keep = [i for i, e in zip(chunk, encoded, strict=True) if len(e.items)]
            if keep:
                kept = [e for e in encoded if len(e.items)]
                vectors.append(rec.user_embeddings(kept, [rec.user_index(rows.users[i]) for i in keep]))
                users += [rows.users[i] for i in keep]
        queries = np.concatenate(vectors) if vectors else np.zeros((0, items.shape[1]), np.float32)
        write_parquet(embedding_table(users, queries, "user_id"), args.output / USERS_FILE)
        print(f"wrote {args.output / USERS_FILE} ({len(users)} users)")
    if args.index == "faiss":
        if queries is None or len(queries) == 0:  # no users: items near each other stand in for queries
            rng = np.random.default_rng(0)
            sample = items[rng.choice(len(items), size=min(1000, len(items)), replace=False)]
            queries = sample + rng.normal(scale=0.05, size=sample.shape).astype(np.float32)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        meta = build_faiss_index(items, queries, args.output, rec.fingerprint, args.recall_k)
        print(
            f"wrote {args.output / 'items.faiss'}: {meta['kind']}, recall@{meta['k']} against the exact top-"
            f"{meta['k']} = {meta['recall_at_k']:.4f} over {meta['queries']} queries"
        )
    return 0


def cmd_serve(argv: list[str]) -> int:
    from persrec.serve.server import serve_main

    return serve_main(argv)

"""`persrec` command line: prepare | convert | train | evaluate | quickstart.

Training flags follow the original PerSRec/HLLM scripts: `persrec train --config_file a.yaml b.yaml --loss nce
--epochs 5 --dataset ml-1m --optim_args.learning_rate 1e-3`. Any config key is a flag (`--key value`, dotted for
sections); `persrec train --help` lists them with their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from persrec.config import Config, ConfigError, OptimArgs, load_config, parse_cli_overrides
from persrec.data.schema import DataValidationError


def _split_config_files(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull `--config_file a.yaml b.yaml` (several values) out of the flag list."""
    files: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(argv):
        if argv[index] in ("--config_file", "--config-file"):
            index += 1
            while index < len(argv) and not argv[index].startswith("--"):
                files.append(argv[index])
                index += 1
        else:
            rest.append(argv[index])
            index += 1
    return files, rest


def _config_help() -> str:
    lines = ["config keys (as --key value; defaults shown):"]
    for f in dataclasses.fields(Config):
        if f.name == "optim_args":
            for inner in dataclasses.fields(OptimArgs):
                lines.append(f"  --optim_args.{inner.name} {inner.default}")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{f.name} {default}")
    return "\n".join(lines)


def config_from_argv(argv: list[str]) -> Config:
    files, rest = _split_config_files(argv)
    return load_config(files, parse_cli_overrides(rest))


def _run_training(config: Config) -> int:
    from persrec.train.distributed import setup_distributed, teardown_distributed
    from persrec.train.trainer import Trainer

    ctx = setup_distributed(config.device)
    try:
        trainer = Trainer(config, ctx)
        if config.val_only:  # the original scripts' flag: score the (resumed or fresh) model, train nothing
            trainer.print_validation()
            return 0
        result = trainer.fit()
        trainer.print_report(result)
    finally:
        teardown_distributed()
    return 0


def cmd_train(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print("usage: persrec train [--config_file A.yaml [B.yaml ...]] [--key value ...]\n")
        print(_config_help())
        return 0
    return _run_training(config_from_argv(argv))


def cmd_quickstart(argv: list[str]) -> int:
    """Train HSTU on the embedded MovieLens latest-small with settings sized for a few CPU minutes."""
    from importlib.resources import files

    quick = files("persrec") / "configs" / "quickstart.yaml"
    return _run_training(load_config([str(quick)], parse_cli_overrides(argv)))


def cmd_evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="persrec evaluate", description="Evaluate a checkpoint.")
    parser.add_argument(
        "checkpoint", type=Path, help="run directory, checkpoint directory or best/ directory"
    )
    args, rest = parser.parse_known_args(argv)
    from persrec.eval.evaluate_checkpoint import evaluate_checkpoint

    return evaluate_checkpoint(args.checkpoint, parse_cli_overrides(rest))


def cmd_prepare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="persrec prepare", description="Build a prepared dataset directory from interaction parquet."
    )
    parser.add_argument("--input", required=True, type=Path, help="interactions parquet file or directory")
    parser.add_argument("--output", required=True, type=Path, help="prepared dataset directory to create")
    parser.add_argument("--items", type=Path, help="item table parquet keyed by item id (optional)")
    parser.add_argument("--user_col", default="user_id")
    parser.add_argument(
        "--item_col", default="item_id", help="item id column (a list column = per-user layout)"
    )
    parser.add_argument("--time_col", default="timestamp")
    parser.add_argument("--list_item_col", default="object_id", help="per-user layout: list of item ids")
    parser.add_argument("--list_time_col", default="event_time", help="per-user layout: list of timestamps")
    parser.add_argument("--item_key_col", default="item_id", help="key column of the item table")
    parser.add_argument("--min_user_interactions", type=int, default=0)
    parser.add_argument("--min_item_interactions", type=int, default=0, help="with the user minimum: k-core")
    parser.add_argument("--memory_limit", default="3GB")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset prepare wrote earlier (a directory with other files is never touched)",
    )
    parser.add_argument(
        "--drop_duplicates",
        action="store_true",
        help="drop repeated (user, item, timestamp) rows, keeping the first (they are always counted)",
    )
    args = parser.parse_args(argv)
    from persrec.data.prepare import PrepareOptions, prepare_dataset
    from persrec.data.schema import InputSchema

    schema = InputSchema(
        user_col=args.user_col,
        item_col=args.item_col,
        time_col=args.time_col,
        list_item_col=args.list_item_col,
        list_time_col=args.list_time_col,
        item_key_col=args.item_key_col,
    )
    options = PrepareOptions(
        schema=schema,
        min_user_interactions=args.min_user_interactions,
        min_item_interactions=args.min_item_interactions,
        memory_limit=args.memory_limit,
        drop_duplicates=args.drop_duplicates,
    )
    try:
        store = prepare_dataset(
            args.input, args.output, items=args.items, options=options, overwrite=args.overwrite
        )
    except (FileExistsError, PermissionError) as error:  # an output path in the way, one line
        print(f"persrec: error: {error}", file=sys.stderr)
        return 2
    print(store)
    return 0


def cmd_convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="persrec convert", description="Convert a CSV/TSV/.dat file to parquet."
    )
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--delimiter", help="default: sniffed (',', tab or '::')")
    parser.add_argument("--columns", help="comma-separated names for a file without a header")
    parser.add_argument("--encoding", default="utf-8")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (never the input)"
    )
    args = parser.parse_args(argv)
    from persrec.data.convert import convert_csv_to_parquet

    columns = args.columns.split(",") if args.columns else None
    try:
        out = convert_csv_to_parquet(
            args.input,
            args.output,
            delimiter=args.delimiter,
            columns=columns,
            encoding=args.encoding,
            overwrite=args.overwrite,
        )
    except (FileExistsError, PermissionError) as error:  # an output path in the way, one line
        print(f"persrec: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


COMMANDS = {
    "quickstart": cmd_quickstart,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "prepare": cmd_prepare,
    "convert": cmd_convert,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: persrec {{{'|'.join(COMMANDS)}}} ...  (persrec <command> --help for details)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as error:
        print(f"persrec: configuration error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, DataValidationError) as error:
        # Bad input files get their message, not a traceback.
        print(f"persrec: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`persrec` command line: prepare | convert | stats | train | evaluate | quickstart | models | recommend |
export | serve.

Training flags follow the original PerSRec/HLLM scripts: `persrec train --config_file a.yaml b.yaml --loss nce
--epochs 5 --dataset ml-1m --optim_args.learning_rate 1e-3`. Any config key is a flag (`--key value`, dotted for
sections); `persrec train --help` lists them with their types, defaults and documentation. A mistake (an unknown
key, a value out of range, a missing file) ends the command with exit status 2 and one `persrec: ...` line on
stderr, before anything is written.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from persrec import __version__
from persrec.config import (
    COMMAND_LINE,
    Config,
    ConfigError,
    apply_overrides,
    format_value,
    load_config,
    parse_cli_overrides,
)
from persrec.config_reference import config_reference
from persrec.data.schema import DataValidationError

if TYPE_CHECKING:
    from persrec.train.trainer import Trainer

CONFIG_FLAGS_USAGE = "[--config_file A.yaml [B.yaml ...]] [--key value ...]"


class UsageError(ConfigError):
    """A command's own options were misused (argparse's complaint, as one line)."""


class _ParserExit(Exception):
    """argparse finished early (after --help): leave `main` with this status instead of SystemExit."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the epilog's layout and show each option's default where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and not action.required
            and not any(default is skip for skip in (None, False, argparse.SUPPRESS))
        ):
            text += " (default: %(default)s)"
        return text


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one `persrec: ...` line and exit status 2, like every other mistake."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        # argparse prints nothing, not even the default, for an option without help text.
        if kwargs.get("help") is None and not any(kwargs.get("default") is v for v in (None, False)):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog.removeprefix('persrec ')}: {message}; see {self.prog} --help")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message.strip(), file=sys.stderr if status else sys.stdout)
        raise _ParserExit(status)


def _split_config_files(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull `--config_file a.yaml b.yaml` (several values) out of the flag list."""
    files: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(argv):
        if argv[index] in ("--config_file", "--config-file"):
            index += 1
            start = index
            while index < len(argv) and not argv[index].startswith("--"):
                files.append(argv[index])
                index += 1
            if index == start:
                raise ConfigError("--config_file: expected one or more YAML files after it")
        else:
            rest.append(argv[index])
            index += 1
    return files, rest


def _config_help(base: Config | None = None, sections: tuple[str, ...] | None = None) -> str:
    """Every config key, grouped by the sections of persrec/config.py, with type, value in `base` and doc."""
    groups: dict[str, list[str]] = {}
    for row in config_reference(base):
        if sections is not None and row.section not in sections:
            continue
        lines = groups.setdefault(row.section or "other", [])
        lines.append(f"  --{row.key}  {row.type}, default: {format_value(row.default)}")
        if row.doc:
            lines += textwrap.wrap(row.doc, width=110, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n\n".join(f"{section}:\n" + "\n".join(lines) for section, lines in groups.items())


def config_from_argv(argv: list[str]) -> Config:
    files, rest = _split_config_files(argv)
    return load_config(files, parse_cli_overrides(rest))


def _run_training(
    files: list[str], overrides: dict[str, str], after: Callable[[Trainer], None] | None = None
) -> int:
    """Train (or resume) the run a command line describes; a signal ends it with a checkpoint, exit 128+N.

    `after(trainer)` runs once the report is printed, with the best weights loaded."""
    from persrec.train.distributed import setup_distributed, teardown_distributed
    from persrec.train.interrupt import TrainingInterrupted
    from persrec.train.resume import finished_run_message, training_config
    from persrec.train.trainer import Trainer

    config, resume_from = training_config(files, overrides)
    config.validate()  # before the device, the dataset cache or the run directory is touched
    if (
        resume_from is not None
        and not config.val_only
        and (done := finished_run_message(resume_from, config))
    ):
        print(f"persrec: {done}")
        return 0
    ctx = setup_distributed(config.device)
    try:
        trainer = Trainer(config, ctx, resume_from)
        if config.val_only:  # the original scripts' flag: score the (resumed or fresh) model, train nothing
            trainer.print_validation()
            return 0
        result = trainer.fit()
        trainer.print_report(result)
        if after is not None and ctx.is_main:
            after(trainer)
    except TrainingInterrupted as stop:
        if ctx.is_main:
            print(
                f"persrec: {stop}; checkpoint {stop.checkpoint}; resume with: {stop.resume_command}",
                file=sys.stderr,
            )
        return stop.exit_code
    finally:
        teardown_distributed()
    return 0


def _usage(command: str, summary: str) -> str:
    text = (
        f"{summary} Every key below is a flag: --key value, --key=value, or a bare --key for true; dotted for "
        "sections (--optim_args.learning_rate 1e-3). Precedence: defaults, then each --config_file in order, "
        "then flags. Values are checked before anything is written; an unknown key gets the closest one suggested."
    )
    return f"usage: persrec {command} {CONFIG_FLAGS_USAGE}\n\n{textwrap.fill(text, width=110)}\n"


def cmd_train(argv: list[str]) -> int:
    """Train a model (or resume a run) from config files and flags."""
    if "-h" in argv or "--help" in argv:
        print(_usage("train", "Train a model, or continue a run with --resume."))
        print(_config_help())
        return 0
    files, rest = _split_config_files(argv)
    return _run_training(files, parse_cli_overrides(rest))


def cmd_quickstart(argv: list[str]) -> int:
    """Train PersonalizedHSTU on the embedded MovieLens latest-small in a few CPU minutes, then show what the
    expert cache buys at serving time on this machine."""
    from importlib.resources import files

    quick = files("persrec") / "configs" / "quickstart.yaml"
    if "-h" in argv or "--help" in argv:
        summary = (
            "Train PersonalizedHSTU (HSTU with expert tokens) on the embedded MovieLens latest-small in a few "
            f"CPU minutes, then compare serving through the expert cache with the full pass ({quick})."
        )
        print(_usage("quickstart", summary))
        print("Defaults shown are the quickstart's settings.\n")
        print(_config_help(load_config([str(quick)])))
        return 0
    return _run_training([str(quick)], parse_cli_overrides(argv), after=_print_serving_comparison)


def _print_serving_comparison(trainer: Trainer) -> None:
    from persrec.models.recommender import ExpertRecommender
    from persrec.serve.comparison import compare_serving

    if isinstance(trainer.model, ExpertRecommender):
        comparison = compare_serving(trainer.model, trainer.store, trainer.window, trainer.ctx.device)
        print(comparison.describe())


def _check_evaluation(path: Path, overrides: dict[str, str]) -> None:
    """Fail naming the path or the flag before the dataset and the model are built."""
    from persrec.eval.evaluate_checkpoint import find_weights

    if not path.exists():
        raise ConfigError(
            f"{path} does not exist; expected a run directory, a checkpoint directory or a .safetensors file"
        )
    config_file = find_weights(path).parent / "config.yaml"
    if config_file.is_file():
        config = apply_overrides(load_config([config_file]), overrides, where=COMMAND_LINE)
        config.validate(training=False)


def cmd_evaluate(argv: list[str]) -> int:
    """Re-score saved weights on the validation and test splits."""
    parser = CommandParser(
        prog="persrec evaluate",
        description="Re-score saved weights on the validation and test splits (full ranking over all items).",
        epilog=(
            "Config keys may follow to override the checkpoint's config.yaml, e.g. --filter_seen true --topk 10,50\n"
            "--device cpu --eval_batch_size 64 (all keys: persrec train --help). The evaluation keys, with the\n"
            "defaults of a new run (a checkpoint keeps its own values):\n\n"
        )
        + _config_help(sections=("evaluation",)),
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="run directory (its best weights), checkpoint directory, best/ directory or .safetensors file",
    )
    args, rest = parser.parse_known_args(argv)
    overrides = parse_cli_overrides(rest)
    _check_evaluation(args.checkpoint, overrides)
    from persrec.eval.evaluate_checkpoint import evaluate_checkpoint

    return evaluate_checkpoint(args.checkpoint, overrides)


def cmd_prepare(argv: list[str]) -> int:
    if any(a == "--format" or a.startswith("--format=") for a in argv):
        from persrec.cli_prepare import cmd_prepare_format

        return cmd_prepare_format(argv)
    parser = CommandParser(
        prog="persrec prepare", description="Build a prepared dataset directory from interaction parquet."
    )
    parser.add_argument(
        "--format",
        help="build from a public dataset's raw files instead: ebnerd, merrec, pixelrec, amazon-reviews, "
        "movielens (persrec prepare --format NAME --help lists its options)",
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
    parser = CommandParser(prog="persrec convert", description="Convert a CSV/TSV/.dat file to parquet.")
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


def cmd_models(argv: list[str]) -> int:
    from persrec.hf.models_cli import cmd_models as run_models

    return run_models(argv)


def cmd_stats(argv: list[str]) -> int:
    parser = CommandParser(
        prog="persrec stats",
        description="Print a prepared dataset's size, history lengths, time span and text.",
    )
    parser.add_argument("dataset", type=Path, help="prepared dataset directory (written by persrec prepare)")
    parser.add_argument("--plot", type=Path, help="also write a history-length histogram to this .png")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = parser.parse_args(argv)
    from persrec.data.stats import dataset_stats, format_stats, plot_history_histogram
    from persrec.data.store import PreparedDataset

    dataset = PreparedDataset.open(args.dataset, full_check=False)
    stats = dataset_stats(dataset)
    if args.plot is not None:
        plot_history_histogram(dataset.lengths(), args.plot, title=f"history length: {args.dataset.name}")
    print(json.dumps(stats.to_dict(), indent=2) if args.json else format_stats(stats, args.dataset))
    return 0


def _serving(name: str) -> Callable[[list[str]], int]:
    """A serving command (persrec/serve/commands.py), imported when run."""

    def run(argv: list[str]) -> int:
        from persrec.serve import commands

        return getattr(commands, f"cmd_{name}")(argv)

    return run


COMMANDS = {
    "quickstart": cmd_quickstart,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "prepare": cmd_prepare,
    "convert": cmd_convert,
    "models": cmd_models,
    "stats": cmd_stats,
    "recommend": _serving("recommend"),
    "export": _serving("export"),
    "serve": _serving("serve"),
}


# One line each for `persrec --help`.
COMMAND_SUMMARIES = {
    "quickstart": "train HSTU on the embedded MovieLens latest-small in a few CPU minutes",
    "train": "train a model or resume a run (persrec train --help lists every config key)",
    "evaluate": "re-score a run's or a checkpoint's weights on the validation and test splits",
    "prepare": "build a prepared dataset directory from interaction parquet",
    "convert": "convert a CSV/TSV/.dat file to parquet",
    "models": "list local pretrained models (Hugging Face) or convert one to a plain directory",
    "stats": "print a prepared dataset's users, items, history lengths, time span and text coverage",
    "recommend": "recommend items for a history (JSON) or for every user of a parquet file",
    "export": "write item (and user) embeddings as parquet, optionally a FAISS index",
    "serve": "serve recommendations over HTTP with per-user expert caches (extra: serve)",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: persrec <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {COMMAND_SUMMARIES[name]}" for name in COMMANDS]
    lines += ["", "persrec <command> --help shows its options; persrec --version prints the version."]
    return "\n".join(lines)


def _report(message: str) -> int:
    """One `persrec: ...` line on stderr (newlines folded, so scripts can grep it) and the usage status 2."""
    print("persrec: " + " ".join(message.split()), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"persrec {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return _report(
            f"unknown command {argv[0]!r}; {hint}expected one of: {', '.join(COMMANDS)} (see persrec --help)"
        )
    try:
        return COMMANDS[argv[0]](argv[1:])
    except _ParserExit as done:  # --help of an argparse command
        return done.status
    except ConfigError as error:
        return _report(str(error))
    except (
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        DataValidationError,
    ) as error:
        # Bad input files get their message, not a traceback.
        return _report(f"error: {error}")
    except KeyboardInterrupt:  # before training started (or a second Ctrl-C): nothing to save
        print("persrec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `persrec train --help | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`persrec prepare --format NAME --input PATH --output DIR [options]`: raw public files to a prepared dataset.

The format's builder writes canonical parquet into the cache (skipped when the same files and options were built
before), then ``prepare_dataset`` validates, filters and stores it at ``--output`` like any other input. Each
format's own options come from its options dataclass, so `persrec prepare --format NAME --help` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

from persrec.config import ConfigError


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(field: dataclasses.Field[Any], hints: dict[str, Any]) -> Any:
    hint = hints[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _add_format_options(parser: argparse.ArgumentParser, options_type: type) -> list[str]:
    hints = typing.get_type_hints(options_type)
    names = []
    group = parser.add_argument_group("format options")
    for field in dataclasses.fields(options_type):
        names.append(field.name)
        if f"--{field.name}" in parser._option_string_actions:  # shared with prepare (e.g. --memory_limit)
            continue
        kind = _field_type(field, hints)
        help_text = field.metadata.get("help", "")
        if kind is bool:
            group.add_argument(
                f"--{field.name}",
                type=_parse_bool,
                nargs="?",
                const=True,
                default=field.default,
                help=help_text,
            )
        else:
            group.add_argument(f"--{field.name}", type=kind, default=field.default, help=help_text)
    return names


def cmd_prepare_format(argv: list[str]) -> int:
    from persrec.cli import CommandParser
    from persrec.data.datasets.formats import build_cached, format_names, get_format, make_options
    from persrec.data.datasets.registry import default_cache_dir

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--format")
    known, _ = pre.parse_known_args(argv)
    fmt = get_format(known.format or "")
    parser = CommandParser(
        prog=f"persrec prepare --format {fmt.name}",
        description=f"Build a prepared dataset from raw {fmt.name} files: {fmt.summary}.",
    )
    parser.add_argument("--format", required=True, choices=format_names(), help="raw-file format")
    parser.add_argument("--input", required=True, type=Path, help="raw file or folder of the format")
    parser.add_argument("--output", required=True, type=Path, help="prepared dataset directory to create")
    parser.add_argument(
        "--cache_dir", type=Path, help="where built sources are cached (default: persrec cache)"
    )
    parser.add_argument("--min_user_interactions", type=int, help="default: the format's recorded minimum")
    parser.add_argument("--min_item_interactions", type=int, help="default: the format's recorded minimum")
    parser.add_argument("--memory_limit", default="3GB")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset prepare wrote earlier")
    parser.add_argument(
        "--drop_duplicates", action="store_true", help="drop repeated (user, item, time) rows"
    )
    names = _add_format_options(parser, fmt.options_type)
    args = parser.parse_args(argv)
    options = make_options(fmt, {n: getattr(args, n) for n in names})
    if not args.input.exists():
        raise FileNotFoundError(f"--input {args.input}: no such file or directory")
    cache = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    built = build_cached(fmt, args.input, options, cache)

    from persrec.data.prepare import PrepareOptions, prepare_dataset

    min_user = (
        built.min_user_interactions if args.min_user_interactions is None else args.min_user_interactions
    )
    min_item = (
        built.min_item_interactions if args.min_item_interactions is None else args.min_item_interactions
    )
    if min_user < 0 or min_item < 0:
        raise ConfigError("--min_user_interactions / --min_item_interactions: expected counts >= 0")
    prepare_options = PrepareOptions(
        min_user_interactions=min_user,
        min_item_interactions=min_item,
        memory_limit=args.memory_limit,
        drop_duplicates=args.drop_duplicates,
    )
    try:
        store = prepare_dataset(
            built.interactions,
            args.output,
            items=built.items,
            options=prepare_options,
            overwrite=args.overwrite,
        )
    except (FileExistsError, PermissionError) as error:
        print(f"persrec: error: {error}", file=sys.stderr)
        return 2
    print(store)
    print(f"licence: {built.license_note}")
    return 0

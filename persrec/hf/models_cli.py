"""`persrec models list | convert NAME --output DIR`: the local pretrained models and their conversion."""

from __future__ import annotations

from pathlib import Path

from persrec.cli import CommandParser
from persrec.hf.catalog import (
    MODELS_DIR_ENV,
    check_convert_output,
    convert_local_model,
    find_local_models,
    get_local_model,
    install_hint,
)

GGUF_NOTE = (
    "GGUF models load directly but are dequantised on every load (about 30 s for SmolLM2); "
    "persrec models convert NAME --output DIR writes an fp32 directory that loads in about a second."
)


def _parser() -> CommandParser:
    parser = CommandParser(
        prog="persrec models",
        description=(
            "Local pretrained models for --item_pretrain_dir / --user_pretrain_dir: installed model packages "
            f"(found without importing them) and directories under ${MODELS_DIR_ENV}. Nothing is downloaded."
        ),
    )
    commands = parser.add_subparsers(dest="action", required=True, parser_class=CommandParser)
    commands.add_parser("list", help="show the local models persrec can find")
    convert = commands.add_parser(
        "convert",
        help="write a model as a plain Hugging Face directory (GGUF dequantised to fp32 safetensors)",
    )
    convert.add_argument("name", help="a name from persrec models list")
    convert.add_argument("--output", required=True, type=Path, help="directory to create")
    convert.add_argument(
        "--overwrite", action="store_true", help="replace an output that persrec models convert wrote earlier"
    )
    return parser


def _list() -> int:
    models = find_local_models()
    if not models:
        print(f"no local models found; {install_hint()}")
        return 0
    rows = [("name", "format", "architecture", "source", "path")]
    rows += [(m.name, m.format, m.architecture, m.source, str(m.path)) for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4])
    if any(m.format == "gguf" for m in models):
        print("\n" + GGUF_NOTE)
    return 0


def cmd_models(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.action == "list":
        return _list()
    model = get_local_model(args.name)
    check_convert_output(args.output.expanduser().resolve(), args.overwrite)
    print(f"converting {model.name} ({model.format}, {model.path}) ...", flush=True)
    result = convert_local_model(model, args.output, overwrite=args.overwrite)
    check = "" if result.max_abs_diff is None else f"; reload check: max |diff| {result.max_abs_diff:.2e}"
    params = "" if result.parameters is None else f", {result.parameters / 1e6:.1f} M parameters"
    print(f"wrote {result.output} in {result.seconds:.1f} s{params}{check}")
    print(f"use it with --item_pretrain_dir {result.output} (or --user_pretrain_dir)")
    return 0

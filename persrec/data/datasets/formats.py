"""Raw-file formats that ``persrec prepare --format NAME`` and ``--dataset NAME --data_path DIR`` understand.

Each format is a builder module (raw public files -> canonical ``interactions.parquet`` + ``items.parquet``) with
an options dataclass; the builder's output is cached under ``<cache>/sources/<name>-<hash>`` keyed by the raw files
(path, size, mtime), the builder version and the options, so a second ``prepare`` of the same files skips it.
Presets are the paper's named variants: a format with fixed options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persrec.config import ConfigError
from persrec.data.datasets import amazon, ebnerd, merrec, movielens_csv, pixelrec
from persrec.data.datasets.movielens import BuiltDataset

# Bump when a builder's output changes, so cached canonical parquet is rebuilt.
FORMAT_BUILDER_VERSION = 1


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    summary: str
    options_type: type
    input_files: Callable[[Path, Any], list[Path]]
    build: Callable[[Path, Path, Any], BuiltDataset]


FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in (
        DatasetFormat(
            "ebnerd",
            "EB-NeRD news clicks: history.parquet (+ behaviors.parquet, articles.parquet)",
            ebnerd.EbnerdOptions,
            ebnerd.input_files,
            ebnerd.build_ebnerd,
        ),
        DatasetFormat(
            "merrec",
            "MerRec marketplace events: monthly parquet files",
            merrec.MerrecOptions,
            merrec.input_files,
            merrec.build_merrec,
        ),
        DatasetFormat(
            "pixelrec",
            "PixelRec: dataset/<Pixel*>.csv + information/<Pixel*>.csv (HLLM layout)",
            pixelrec.PixelrecOptions,
            pixelrec.input_files,
            pixelrec.build_pixelrec,
        ),
        DatasetFormat(
            "amazon-reviews",
            "Amazon reviews: 2014 ratings_<C>.csv + meta_<C>.json.gz, or 2018 <C>.csv + meta_<C>.json.gz",
            amazon.AmazonOptions,
            amazon.input_files,
            amazon.build_amazon,
        ),
        DatasetFormat(
            "movielens",
            "MovieLens CSV releases (ML-20M, ML-25M, ml-latest: ratings.csv + movies.csv) or ML-1M .dat files",
            movielens_csv.MovielensOptions,
            movielens_csv.input_files,
            movielens_csv.build_movielens,
        ),
    )
}

# The paper's filtered variants, usable as --dataset names.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "eb_nerd_512": ("ebnerd", {"min_clicks": 512}),
    "merrec_2000": ("merrec", {"min_seq_len": 2000}),
}


def format_names() -> list[str]:
    return sorted(FORMATS)


def get_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise ConfigError(f"--format {name!r}: expected one of {', '.join(format_names())}")
    return FORMATS[name]


def make_options(fmt: DatasetFormat, values: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(fmt.options_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"--{unknown[0]}: not an option of format {fmt.name} (its options: {', '.join(sorted(known)) or 'none'})"
        )
    return fmt.options_type(**values)


def option_fields(fmt: DatasetFormat) -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(fmt.options_type))


def _fingerprint(paths: list[Path]) -> list[list[object]]:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def build_cached(fmt: DatasetFormat, source: Path, options: Any, cache_dir: Path) -> BuiltDataset:
    """Run the format's builder into the cache, unless an earlier run of the same files and options is there."""
    from persrec.data.datasets.registry import _cached_build

    source = Path(source).expanduser()
    key = {
        "builder": fmt.name,
        "version": FORMAT_BUILDER_VERSION,
        "files": _fingerprint(fmt.input_files(source, options)),
        "options": dataclasses.asdict(options),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cache_dir) / "sources" / f"{fmt.name}-{digest}"
    return _cached_build(out, key, lambda target: fmt.build(source, target, options))

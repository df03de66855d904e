"""Named datasets: turn ``"ml-1m"`` (or a prepared directory) into a ready-to-use ``PreparedDataset``.

Every named dataset goes through the same two cached steps: its builder writes canonical parquet under
``<cache>/sources/<name>`` (skipped while a stamp says the raw files are unchanged), then ``prepare_dataset``
writes the prepared dataset to ``<cache>/<name>`` (itself a no-op when nothing changed). The prepared directory is
a plain path, so it can also be passed back to :func:`resolve_dataset` or shared between runs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from persrec.atomic import atomic_write_json
from persrec.config import ConfigError
from persrec.data.datasets.movielens import (
    INTERACTIONS_FILE,
    ITEMS_FILE,
    ML_1M_CORE_FILES,
    ML_1M_RAW_FILES,
    ML_LATEST_SMALL_LICENSE,
    BuiltDataset,
    build_ml_1m,
    ml_1m_layout,
)
from persrec.data.datasets.synthetic import GENERATOR_VERSION, SyntheticConfig, generate_synthetic

if TYPE_CHECKING:
    from persrec.data.store import PreparedDataset

DATASETS: dict[str, str] = {
    "ml-latest-small": "MovieLens latest-small (embedded): 610 users, 9,724 movies, 100,836 ratings",
    "ml-1m": "MovieLens 1M, 5-core: 6,040 users, 3,416 movies (raw files needed, see PERSREC_ML1M_DIR)",
    "synthetic": "generated users with stable long-term and drifting short-term interests",
    # Raw-file formats (persrec/data/datasets/formats.py): need --data_path pointing at the raw files.
    "ebnerd": "EB-NeRD news clicks (raw files needed: --data_path)",
    "eb_nerd_512": "EB-NeRD, users with at least 512 clicks (the paper's filter; --data_path)",
    "merrec": "MerRec marketplace events (raw files needed: --data_path)",
    "merrec_2000": "MerRec, users with at least 2000 events (the paper's filter; --data_path)",
    "pixelrec": "PixelRec in the HLLM layout (raw files needed: --data_path)",
    "amazon-reviews": "Amazon reviews 2014 / 2018 with item text (raw files needed: --data_path)",
    "movielens": "MovieLens CSV releases such as ML-20M (raw files needed: --data_path)",
}

MANIFEST_FILE = "manifest.json"
ML_1M_FOLDER = "movielens-1m"
EMBEDDED_FOLDER = "ml-latest-small"
# Bump when a builder's output changes, so cached canonical parquet is rebuilt.
BUILDER_VERSION = 1
_STAMP_FILE = "build.json"
_REPO_ROOT = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------------------------------- locations


def shared_data_candidates() -> list[Path]:
    """Where the shared datasets folder is looked for: ``$PERSREC_SHARED_DATA``, else next to the source tree."""
    env = os.environ.get("PERSREC_SHARED_DATA")
    if env:
        return [Path(env).expanduser()]
    return [_REPO_ROOT.parent / "shared" / "data", _REPO_ROOT / "shared" / "data"]


def shared_data_dir() -> Path | None:
    """The shared datasets folder if one exists (tests use it to decide whether to skip)."""
    return next((p for p in shared_data_candidates() if p.is_dir()), None)


def default_cache_dir() -> Path:
    env = os.environ.get("PERSREC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "persrec"


def embedded_dataset_dir() -> Path:
    """Folder of the ml-latest-small parquet shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "resources" / EMBEDDED_FOLDER


def ml_1m_candidates(data_path: Path | None = None) -> list[Path]:
    """Folders that may hold ML-1M, most specific first; an explicit ``data_path`` disables the fallbacks."""
    if data_path is not None:
        data_path = Path(data_path).expanduser()
        return [data_path / ML_1M_FOLDER, data_path]
    env = os.environ.get("PERSREC_ML1M_DIR")
    if env:
        return [Path(env).expanduser()]
    return [root / ML_1M_FOLDER for root in shared_data_candidates()]


def find_ml_1m(data_path: Path | None = None) -> Path:
    """The first candidate folder holding either ML-1M layout, or a ``FileNotFoundError`` saying what to set."""
    tried = ml_1m_candidates(data_path)
    for path in tried:
        if ml_1m_layout(path) is not None:
            return path
    raise FileNotFoundError(
        "ml-1m raw files not found; tried: "
        + ", ".join(str(p) for p in tried)
        + f". Expected {' + '.join(ML_1M_RAW_FILES)} (GroupLens) or {' + '.join(ML_1M_CORE_FILES)} (5-core copy). "
        "Pass data_path (--data_path) pointing at the folder that holds movielens-1m/ (or at that folder itself), "
        "or set PERSREC_ML1M_DIR=/path/to/movielens-1m or PERSREC_SHARED_DATA=/path/to/shared/data."
    )


# --------------------------------------------------------------------------------------------------- building


def _file_fingerprint(paths: list[Path]) -> list[list[object]]:
    out: list[list[object]] = []
    for path in paths:
        stat = path.stat()
        out.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def _cached_build(
    out_dir: Path, key: dict[str, object], build: Callable[[Path], BuiltDataset]
) -> BuiltDataset:
    """Run ``build`` unless ``out_dir`` holds a finished build for the same key (raw files, versions, config)."""
    stamp_path = out_dir / _STAMP_FILE
    if stamp_path.is_file():
        try:
            stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stamp = {}
        if stamp.get("key") == key and (out_dir / INTERACTIONS_FILE).is_file():
            built = stamp["built"]
            items = Path(built["items"]) if built["items"] else None
            return BuiltDataset(**{**built, "interactions": Path(built["interactions"]), "items": items})
    stamp_path.unlink(missing_ok=True)
    built = build(out_dir)
    record = {**vars(built), "interactions": str(built.interactions), "items": str(built.items or "")}
    atomic_write_json(stamp_path, {"key": key, "built": record}, indent=2)
    return built


def synthetic_cache_name(config: SyntheticConfig) -> str:
    """``synthetic-<hash>``: a stable name per config and generator version."""
    payload = json.dumps({"version": GENERATOR_VERSION, **config.to_dict()}, sort_keys=True)
    return f"synthetic-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _prepare(built: BuiltDataset, output: Path, progress: bool) -> PreparedDataset:
    from persrec.data.prepare import PrepareOptions, prepare_dataset

    options = PrepareOptions(
        min_user_interactions=built.min_user_interactions, min_item_interactions=built.min_item_interactions
    )
    # The cache directory is ours: replace it when the source changed (prepare is a no-op when it did not).
    return prepare_dataset(
        built.interactions, output, items=built.items, options=options, overwrite=True, progress=progress
    )


def _resolve_ml_latest_small(cache_dir: Path, progress: bool) -> PreparedDataset:
    package_dir = resources.files("persrec.data").joinpath("resources", EMBEDDED_FOLDER)
    with ExitStack() as stack:
        interactions = stack.enter_context(resources.as_file(package_dir.joinpath(INTERACTIONS_FILE)))
        items = stack.enter_context(resources.as_file(package_dir.joinpath(ITEMS_FILE)))
        built = BuiltDataset(
            interactions=interactions,
            items=items,
            min_user_interactions=0,
            min_item_interactions=0,
            name="ml-latest-small",
            license_note=ML_LATEST_SMALL_LICENSE,
        )
        return _prepare(built, cache_dir / "ml-latest-small", progress)


def _resolve_ml_1m(cache_dir: Path, data_path: Path | None, progress: bool) -> PreparedDataset:
    raw_dir = find_ml_1m(data_path)
    layout = ml_1m_layout(raw_dir)
    files = ML_1M_RAW_FILES if layout == "grouplens" else ML_1M_CORE_FILES
    key = {
        "builder": "ml-1m",
        "version": BUILDER_VERSION,
        "files": _file_fingerprint([raw_dir / f for f in files]),
    }
    built = _cached_build(cache_dir / "sources" / "ml-1m", key, lambda out: build_ml_1m(raw_dir, out))
    return _prepare(built, cache_dir / "ml-1m", progress)


def _resolve_synthetic(cache_dir: Path, config: SyntheticConfig, progress: bool) -> PreparedDataset:
    name = synthetic_cache_name(config)
    key = {"builder": "synthetic", "version": GENERATOR_VERSION, "config": config.to_dict()}
    built = _cached_build(cache_dir / "sources" / name, key, lambda out: generate_synthetic(config, out))
    return _prepare(built, cache_dir / name, progress)


def _resolve_format(name: str, cache_dir: Path, data_path: Path | None, progress: bool) -> PreparedDataset:
    """A raw-file format (or one of its presets) built from ``data_path`` with its default options."""
    from persrec.data.datasets.formats import FORMATS, PRESETS, build_cached, make_options

    format_name, values = PRESETS.get(name, (name, {}))
    fmt = FORMATS[format_name]
    if data_path is None:
        raise ConfigError(
            f"--dataset {name} needs --data_path: the folder (or file) holding the raw {format_name} files "
            f"({fmt.summary}); or prepare them once with persrec prepare --format {format_name}"
        )
    built = build_cached(fmt, data_path, make_options(fmt, values), cache_dir)
    return _prepare(built, cache_dir / name, progress)


# --------------------------------------------------------------------------------------------------- entry point


def resolve_dataset(
    name_or_path: str | os.PathLike[str],
    *,
    data_path: Path | None = None,
    cache_dir: Path | None = None,
    synthetic: SyntheticConfig | None = None,
    progress: bool = True,
) -> PreparedDataset:
    """Open a prepared dataset directory, or build, prepare and cache a named dataset (see ``DATASETS``)."""
    from persrec.data.store import PreparedDataset

    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if (path / MANIFEST_FILE).is_file():
        return PreparedDataset.open(path)

    name = text.strip().lower()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if name == "ml-latest-small":
        return _resolve_ml_latest_small(cache, progress)
    if name == "ml-1m":
        return _resolve_ml_1m(cache, Path(data_path) if data_path is not None else None, progress)
    if name == "synthetic":
        return _resolve_synthetic(cache, synthetic or SyntheticConfig(), progress)
    if name in DATASETS:
        return _resolve_format(name, cache, Path(data_path) if data_path is not None else None, progress)

    if path.is_dir():
        raise FileNotFoundError(
            f"{path} is a directory but not a prepared dataset (no {MANIFEST_FILE}); prepare it first"
        )
    known = ", ".join(sorted(DATASETS))
    if os.sep in text or (os.altsep and os.altsep in text):
        raise FileNotFoundError(f"no prepared dataset at {path}; known dataset names: {known}")
    close = difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    # A ConfigError (a ValueError) so that the command line reports it in one line naming the option.
    raise ConfigError(
        f"--dataset {text!r}: expected a named dataset ({known}) or the path of a prepared dataset directory "
        f"(one holding {MANIFEST_FILE}, written by persrec prepare).{hint}"
    )

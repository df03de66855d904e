"""Out-of-core ``prepare``: raw interaction parquet -> validated, filtered, memory-mapped CSR store.

All heavy lifting runs inside DuckDB with a memory limit and a spill directory, so inputs far
larger than RAM are handled; Python only streams the final sorted rows into ``.npy`` files.

Decisions worth knowing:

* Dense item indices 1..N follow the sort order of the original item id (numeric for integer
  ids, byte-wise for strings); user indices 0..U-1 follow the original user id. Both are
  deterministic and independent of file order.
* Each history is sorted by timestamp; equal timestamps keep input order (file order, then row
  order, then list position for the per-user layout). Timestamps are stored as epoch seconds
  (floats and sub-second timestamps are floored), but sorting uses the input precision
  (microseconds for timestamp types). Zone-aware timestamps are converted to UTC epochs.
* The k-core filter counts every row, so repeated (user, item) pairs count more than once.
* Only user, item and time are stored; other input columns are ignored (they stay in the source).
* Users whose per-user list is empty have no interactions and therefore do not appear.
* Rows repeating a (user, item, timestamp) triple (at input precision) are counted and reported;
  ``drop_duplicates`` keeps only the first of each in input order.
* ``overwrite`` only ever replaces a directory that ``prepare`` wrote, and deletes only the files
  it wrote there (see :func:`owned_files`); anything else in the way is refused, never deleted.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
from tqdm.auto import tqdm

from persrec import __version__
from persrec.data import staging, writers
from persrec.data.schema import (
    DataValidationError,
    InputSchema,
    ResolvedColumns,
    check_unique_keys,
    validate_item_table_file,
)
from persrec.data.store import (
    DATASET_FORMAT,
    FORMAT_VERSION,
    ITEM_IDS_FILE,
    ITEM_TABLE_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    MANIFEST_KEYS,
    OFFSETS_FILE,
    STORE_FILES,
    TIMESTAMPS_FILE,
    USER_IDS_FILE,
    PreparedDataset,
)

logger = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class PrepareOptions:
    """How to read and filter the input, and the resources DuckDB may use.

    ``min_*_interactions`` are applied together and repeatedly until nothing changes (a k-core),
    because dropping rare items can push a user below the threshold and vice versa.
    ``drop_duplicates`` removes repeated (user, item, timestamp) rows before the k-core; they are
    always counted and reported. Only ``schema``, the thresholds and ``drop_duplicates`` affect
    the result; the rest are resource knobs.
    """

    schema: InputSchema = field(default_factory=InputSchema)
    min_user_interactions: int = 0
    min_item_interactions: int = 0
    drop_duplicates: bool = False
    memory_limit: str = "3GB"
    threads: int = 2
    temp_dir: Path | None = None
    batch_rows: int = 1 << 20

    def result_key(self) -> dict[str, Any]:
        """The options that change the prepared output (used in the source fingerprint).

        ``drop_duplicates`` appears only when set, so datasets prepared before the option existed
        keep their fingerprint and stay up to date.
        """
        key: dict[str, Any] = {
            "schema": self.schema.to_dict(),
            "min_user_interactions": int(self.min_user_interactions),
            "min_item_interactions": int(self.min_item_interactions),
        }
        if self.drop_duplicates:
            key["drop_duplicates"] = True
        return key


# --------------------------------------------------------------------------------------------- input files


def resolve_parquet_files(path: str | Path) -> list[Path]:
    """Expand a parquet file, a directory (searched recursively) or a glob into a sorted file list."""
    text = os.fspath(path)
    if _GLOB_CHARS & set(text):
        files = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
        if not files:
            raise FileNotFoundError(f"{text}: pattern matches no files")
        return files
    p = Path(text)
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*.parquet")
            if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
        )
        if not files:
            raise FileNotFoundError(f"{p}: directory contains no .parquet files")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file or directory")
    return [p]


def source_fingerprint(files: list[Path], item_files: list[Path], options: PrepareOptions) -> str:
    """Hash of input paths, sizes, mtimes and result-affecting options: equal hash, equal output."""

    def describe(f: Path) -> list[Any]:
        st = f.stat()
        return [str(f.resolve()), st.st_size, st.st_mtime_ns]

    payload = {
        "format_version": FORMAT_VERSION,
        "interactions": [describe(f) for f in files],
        "items": [describe(f) for f in item_files],
        "options": options.result_key(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- build


class _Steps:
    """Step-level progress bar plus debug timings."""

    def __init__(self, total: int, enabled: bool) -> None:
        # disable=None: no bar when stderr is not a terminal (logs, pipes), where it would only add lines
        # before an error message.
        self.bar = tqdm(
            total=total, desc="prepare", unit="step", disable=None if enabled else True, file=sys.stderr
        )

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_description(f"prepare: {name}")
        start = time.perf_counter()
        yield
        logger.debug("prepare step %s took %.2fs", name, time.perf_counter() - start)
        self.bar.update(1)

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(text)
        if text:
            logger.debug("prepare: %s", text)

    def close(self) -> None:
        self.bar.set_description("prepare: done")
        self.bar.close()


def _written_files(has_items: bool) -> list[str]:
    """The files ``_build`` writes, as recorded in the manifest for a later ``overwrite``."""
    files = [MANIFEST_FILE, OFFSETS_FILE, ITEMS_FILE, TIMESTAMPS_FILE, ITEM_IDS_FILE, USER_IDS_FILE]
    return sorted(files + [ITEM_TABLE_FILE] * has_items)


def _manifest(
    counts: staging.Counts,
    max_history: int,
    cols: ResolvedColumns,
    options: PrepareOptions,
    source_info: dict[str, Any],
    has_items: bool,
    duplicates: int,
) -> dict[str, Any]:
    id_type = {"int": "int64", "string": "string"}
    return {
        "format": DATASET_FORMAT,
        "files": _written_files(has_items),
        "format_version": FORMAT_VERSION,
        "num_users": counts.users,
        "num_items": counts.items,
        "num_interactions": counts.interactions,
        "max_history": max_history,
        "source": source_info,
        "schema": {
            **options.schema.to_dict(),
            "layout": cols.layout,
            "resolved": {"user": cols.user_col, "item": cols.item_col, "time": cols.time_col},
            "user_id_type": id_type[cols.user_kind],
            "item_id_type": id_type[cols.item_kind],
            "time_type": cols.time_kind,
            "id_order": "dense indices follow the sorted original ids",
        },
        "filters": {
            "min_user_interactions": int(options.min_user_interactions),
            "min_item_interactions": int(options.min_item_interactions),
        },
        "duplicates": {
            "key": [cols.user_col, cols.item_col, cols.time_col],
            "count": duplicates,
            "dropped": bool(options.drop_duplicates),
        },
        "has_item_table": has_items,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "persrec_version": __version__,
    }


def _duplicates_note(count: int, cols: ResolvedColumns, src: staging.Source, dropped: bool) -> str:
    key = f"({cols.user_col}, {cols.item_col}, {cols.time_col})"
    where = staging.file_names(src.files)
    if dropped:
        return f"persrec: dropped {count} duplicate {key} rows in {where}"
    return f"persrec: {count} duplicate {key} rows in {where}; pass --drop_duplicates to drop them"


def _build(
    out: Path,
    work: Path,
    src: staging.Source,
    item_files: list[Path],
    item_text: list[str],
    options: PrepareOptions,
    source_info: dict[str, Any],
    progress: bool,
) -> None:
    cols = src.cols
    filtering = options.min_user_interactions > 1 or options.min_item_interactions > 1
    steps = _Steps(total=8 + bool(item_files), enabled=progress)
    try:
        with staging.connect(work, options.memory_limit, options.threads) as con:
            with steps.step("reading input"), staging.reading(con, src.files):
                staging.stage_raw(con, src)
            with steps.step("validating"):
                staging.check_staged(con, src)
            with steps.step("duplicates"):
                duplicates = staging.count_duplicates(con)
                if duplicates and options.drop_duplicates:
                    staging.drop_duplicates(con, cols.layout)
                if duplicates:
                    tqdm.write(
                        _duplicates_note(duplicates, cols, src, options.drop_duplicates), file=sys.stderr
                    )
            with steps.step("k-core filter" if filtering else "counting"):
                rounds = staging.kcore(
                    con,
                    options.min_user_interactions,
                    options.min_item_interactions,
                    lambda k, du, di: steps.note(f"round {k}: -{du} users, -{di} items"),
                )
                steps.note(f"k-core stable after {rounds} round(s)" if filtering else "")
            with steps.step("assigning ids"):
                counts = staging.assign_ids(
                    con, src, options.min_user_interactions, options.min_item_interactions
                )
            with steps.step("writing id maps"):
                writers.write_id_maps(con, cols, out, options.batch_rows)
            with steps.step("sorting histories"):
                max_history = writers.write_histories(con, cols, out, options.batch_rows, progress)
            if item_files:
                with steps.step("item table"), staging.reading(con, item_files):
                    writers.write_item_table(
                        con,
                        item_files,
                        item_text,
                        options.schema.item_key_col,
                        cols.item_kind,
                        out,
                        options.batch_rows,
                    )
            with steps.step("manifest"):
                manifest = _manifest(
                    counts, max_history, cols, options, source_info, bool(item_files), duplicates
                )
                (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    except duckdb.OutOfMemoryException as exc:
        raise MemoryError(
            f"prepare ran out of memory ({exc}); raise PrepareOptions.memory_limit, lower threads, "
            "or point temp_dir at a disk with more free space"
        ) from exc
    finally:
        steps.close()


# --------------------------------------------------------------------------------------------- entry point


def owned_files(directory: Path) -> frozenset[str] | None:
    """The file names ``prepare`` wrote into ``directory``, or None when it did not write it.

    The mark is in ``manifest.json`` itself (``"format": "persrec-prepared-dataset"`` plus the
    list of ``files``), not in a separate file, so a dataset stays one self-describing directory
    and the mark cannot be separated from the data it vouches for. Datasets written before the
    mark existed are recognised by persrec's own manifest keys; for those, only the fixed store
    file names count as persrec's.
    """
    try:
        manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if manifest.get("format") == DATASET_FORMAT:
        files = manifest.get("files")
        if not isinstance(files, list) or not all(_plain_name(f) for f in files):
            return None
        return frozenset(files) | {MANIFEST_FILE}
    if "persrec_version" in manifest and all(key in manifest for key in MANIFEST_KEYS):
        return STORE_FILES
    return None


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _foreign_entries(directory: Path, owned: frozenset[str]) -> list[str]:
    """Entries of ``directory`` that are not plain files persrec wrote there."""
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.name not in owned or entry.is_symlink() or not entry.is_file()
    )


def _check_replaceable(output: Path) -> None:
    """Raise unless ``output`` is empty or holds nothing but the files ``prepare`` wrote there."""
    if not any(output.iterdir()):
        return
    owned = owned_files(output)
    if owned is None:
        raise FileExistsError(
            f"{output}: exists, is not empty and is not a prepared dataset written by persrec "
            f'(no {MANIFEST_FILE} with "format": "{DATASET_FORMAT}"); nothing was changed, '
            "choose another output directory"
        )
    foreign = _foreign_entries(output, owned)
    if foreign:
        raise FileExistsError(
            f"{output}: holds {output / foreign[0]}, which persrec did not write; nothing was changed, "
            "move it out of the dataset directory or choose another output directory"
        )


def _remove_owned(directory: Path) -> bool:
    """Delete the files ``prepare`` wrote in ``directory``, then the directory if that emptied it."""
    try:
        for name in owned_files(directory) or ():
            (directory / name).unlink(missing_ok=True)
        directory.rmdir()
    except OSError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(output: Path) -> None:
    """Delete leftovers of killed runs (their pid no longer exists) next to ``output``.

    A ``.tmp-`` build directory is entirely persrec's; a replaced ``.old-`` dataset loses only the
    files persrec wrote, so anything a user put there survives.
    """
    if not output.parent.is_dir():
        return
    for entry in output.parent.glob(f".{glob.escape(output.name)}.*-*"):
        kind, _, pid = entry.name.rpartition("-")
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == f".{output.name}.tmp":
            shutil.rmtree(entry, ignore_errors=True)
        elif kind == f".{output.name}.old" and entry.is_dir():
            _remove_owned(entry)


def _existing(output: Path, fingerprint: str, overwrite: bool, progress: bool) -> PreparedDataset | None:
    """Return the existing dataset when it is up to date; raise when it may not be replaced."""
    if not output.exists():
        return None
    if not output.is_dir():
        raise FileExistsError(f"{output}: exists and is not a directory; choose another output directory")
    try:
        old = json.loads((output / MANIFEST_FILE).read_text())
        old_fp = old.get("source", {}).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        old_fp = None
    if old_fp == fingerprint:
        try:
            dataset = PreparedDataset.open(output)
        except DataValidationError:
            if not overwrite:
                raise
        else:
            logger.info("%s is up to date", output)
            if progress:
                print(f"prepare: {output} is up to date", file=sys.stderr)
            return dataset
    _check_replaceable(output)  # even with overwrite: never delete what persrec did not write
    if any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output}: already exists and was prepared from different input or options; "
            "pass --overwrite (overwrite=True) to replace it"
        )
    return None


def _install(tmp: Path, output: Path) -> None:
    """Move the finished build into place; the replaced dataset loses only persrec's files."""
    if not output.exists():
        os.replace(tmp, output)
        return
    _check_replaceable(output)  # again: something may have been added while the build ran
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    os.replace(output, old)
    os.replace(tmp, output)
    if not _remove_owned(old):
        left = ", ".join(sorted(os.listdir(old)))
        print(f"persrec: kept {old}, the replaced dataset: could not remove {left}", file=sys.stderr)


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _make_build_dir(output: Path) -> Path:
    """Create the temp build directory next to ``output``; a read-only parent is named clearly."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(output)
        tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except NotADirectoryError as exc:
        raise FileNotFoundError(f"{output}: cannot create it, {exc.filename} is not a directory") from exc
    except OSError as exc:
        if exc.errno not in _NOT_WRITABLE:
            raise
        raise PermissionError(
            f"{output}: cannot write there, {exc.filename or output.parent} is not writable ({exc.strerror}); "
            "choose another output directory"
        ) from exc
    return tmp


def prepare_dataset(
    interactions: Path,
    output: Path,
    *,
    items: Path | None = None,
    options: PrepareOptions = PrepareOptions(),
    overwrite: bool = False,
    progress: bool = True,
) -> PreparedDataset:
    """Validate, filter and convert interaction parquet into a prepared dataset at ``output``.

    ``interactions`` is a parquet file, a directory of them or a glob; ``items`` optionally adds an
    item table keyed by ``schema.item_key_col``. The output appears atomically; re-running with
    unchanged input and options returns the existing dataset without work. ``overwrite`` replaces
    a dataset this function wrote earlier; a directory holding anything else is refused.
    """
    output = Path(output)
    files = [f.resolve() for f in resolve_parquet_files(interactions)]
    item_files = [f.resolve() for f in resolve_parquet_files(items)] if items is not None else []
    fingerprint = source_fingerprint(files, item_files, options)
    existing = _existing(output, fingerprint, overwrite, progress)
    if existing is not None:
        return existing

    src = staging.validate_sources(files, options.schema)
    item_text: list[str] = []
    if item_files:
        for f in item_files:
            kind, item_text = validate_item_table_file(f, options.schema)
            if kind != src.cols.item_kind:
                raise DataValidationError(
                    f"{f}: column '{options.schema.item_key_col}' holds {kind} keys but the interactions' "
                    f"item ids are {src.cols.item_kind}s; the key must use the same ids"
                )
        check_unique_keys(item_files, options.schema.item_key_col)

    tmp = _make_build_dir(output)
    own_work = options.temp_dir is None
    work = (
        tmp / "_work" if own_work else Path(tempfile.mkdtemp(prefix="persrec-prepare-", dir=options.temp_dir))
    )
    source_info = {
        "files": [str(f) for f in files],
        "item_files": [str(f) for f in item_files],
        "fingerprint": fingerprint,
    }
    try:
        _build(tmp, work, src, item_files, item_text, options, source_info, progress)
        shutil.rmtree(work)
        _install(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if not own_work:
            shutil.rmtree(work, ignore_errors=True)
    return PreparedDataset.open(output)

"""Streaming CSV/TSV/GroupLens ``.dat`` to parquet conversion.

Everything downstream reads parquet, so raw text dumps are converted once. DuckDB's CSV reader
streams (bounded memory), decompresses ``.gz`` and accepts multi-character separators such as
GroupLens' ``::``; encodings DuckDB does not know are transcoded to UTF-8 in a streaming pass.
"""

from __future__ import annotations

import codecs
import csv
import errno
import gzip
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import duckdb

from persrec.atomic import atomic_path
from persrec.data.schema import DataValidationError

# Order matters: '::' must be tried before any single character it could be confused with.
DELIMITER_CANDIDATES = ("::", "\t", ",", ";", "|")
_SNIFF_BYTES = 1 << 16
_SNIFF_LINES = 50
# Encodings DuckDB's CSV reader handles natively (as Python codec names).
_NATIVE_ENCODINGS = {"utf-8": "utf-8", "iso8859-1": "latin-1", "utf-16": "utf-16"}


def _open_text(src: Path, encoding: str):
    if src.name.endswith(".gz"):
        return gzip.open(src, "rt", encoding=encoding, newline="")
    return open(src, encoding=encoding, newline="")  # noqa: SIM115 - returned to the caller's with-block


def _head_lines(src: Path, encoding: str) -> list[str]:
    try:
        with _open_text(src, encoding) as fh:
            text = fh.read(_SNIFF_BYTES)
    except UnicodeDecodeError as exc:
        raise DataValidationError(f"{src}: cannot decode as {encoding} ({exc}); pass encoding=...") from exc
    except (OSError, EOFError) as exc:
        raise DataValidationError(f"{src}: cannot read ({exc})") from exc
    lines = text.splitlines()
    if len(text) == _SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut mid-way
    return [line for line in lines if line.strip()][:_SNIFF_LINES]


def sniff_delimiter(lines: Sequence[str]) -> str | None:
    """Pick the first candidate splitting every sampled line into the same number (>1) of fields.

    Falls back to the candidate present on every line with the most fields (quoted fields can
    make counts vary), or None when no candidate appears on every line.
    """
    best, best_fields = None, 1
    for cand in DELIMITER_CANDIDATES:
        counts = [line.count(cand) for line in lines]
        if min(counts) > 0 and len(set(counts)) == 1:
            return cand
        if min(counts) + 1 > best_fields:
            best, best_fields = cand, min(counts) + 1
    return best


def _count_fields(line: str, delimiter: str) -> int:
    if len(delimiter) == 1:
        return len(next(csv.reader([line], delimiter=delimiter)))
    return line.count(delimiter) + 1


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _transcode(src: Path, encoding: str, workdir: Path) -> Path:
    out = workdir / "utf8.csv"
    with _open_text(src, encoding) as fin, open(out, "w", encoding="utf-8", newline="") as fout:
        shutil.copyfileobj(fin, fout, length=1 << 20)
    return out


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse to clobber the input or, without ``overwrite``, any existing file."""
    if dst.exists():
        if os.path.samefile(src, dst):
            raise FileExistsError(f"{dst}: is the input file itself; choose another output path")
        if dst.is_dir():
            raise FileExistsError(f"{dst}: is a directory; give the path of the parquet file to write")
        if not overwrite:
            raise FileExistsError(f"{dst}: already exists; pass --overwrite (overwrite=True) to replace it")
    parent = dst.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{dst}: cannot write it, directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{dst}: cannot write it, directory {parent} is not writable")


def _work_dir(dst: Path) -> Path:
    """Scratch directory next to ``dst`` (same filesystem, so the final rename is atomic)."""
    try:
        return Path(tempfile.mkdtemp(prefix=".convert-", dir=dst.parent))
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise PermissionError(
            f"{dst}: cannot write it, directory {dst.parent} is not writable ({exc.strerror})"
        ) from exc


def convert_csv_to_parquet(
    src: Path,
    dst: Path,
    *,
    delimiter: str | None = None,
    columns: list[str] | None = None,
    encoding: str = "utf-8",
    compression: str = "zstd",
    overwrite: bool = False,
) -> Path:
    """Convert a delimited text file (optionally ``.gz``) to parquet, atomically.

    ``delimiter=None`` sniffs one of ``::``, tab, comma, semicolon or pipe. ``columns`` names the
    fields of a header-less file; without it the first line must be a header. Column types are
    inferred from the whole file, so a late non-numeric value cannot break the conversion midway.
    An existing ``dst`` is replaced only with ``overwrite`` and never when it is ``src`` itself
    (same path, link or inode); the directory of ``dst`` must already exist.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    _check_destination(src, dst, overwrite)
    try:
        codec = codecs.lookup(encoding).name
    except LookupError as exc:
        raise DataValidationError(
            f"--encoding {encoding!r}: unknown encoding; expected a Python codec such as utf-8 or latin-1"
        ) from exc

    lines = _head_lines(src, encoding)
    if not lines:
        raise DataValidationError(f"{src}: file is empty")
    if delimiter is None:
        delimiter = sniff_delimiter(lines)
        if delimiter is None:
            raise DataValidationError(
                f"{src}: could not detect the delimiter (tried {', '.join(map(repr, DELIMITER_CANDIDATES))}); "
                "pass delimiter=..."
            )
    n_fields = _count_fields(lines[0], delimiter)
    if columns is not None and len(columns) != n_fields:
        raise DataValidationError(
            f"{src}: {len(columns)} column name(s) given ({', '.join(columns)}) but the first line has "
            f"{n_fields} field(s) separated by {delimiter!r}"
        )

    workdir = _work_dir(dst)
    try:
        with atomic_path(dst) as tmp:
            source = src
            if codec not in _NATIVE_ENCODINGS:
                source = _transcode(src, encoding, workdir)
                codec = "utf-8"
            options = [
                f"delim={_sql_str(delimiter)}",
                f"header={'false' if columns is not None else 'true'}",
                f"encoding={_sql_str(_NATIVE_ENCODINGS[codec])}",
                "compression='auto'",
                "sample_size=-1",
                "skip=0",  # otherwise the sniffer may skip leading rows it deems malformed
            ]
            if columns is not None:
                options.append("names=[" + ", ".join(_sql_str(c) for c in columns) + "]")
            if len(delimiter) > 1:
                options.append("quote=''")  # GroupLens .dat files never quote; titles may start with '"'
            con = duckdb.connect(config={"temp_directory": str(workdir)})
            try:
                con.execute(
                    f"COPY (SELECT * FROM read_csv({_sql_str(str(source))}, {', '.join(options)})) "
                    f"TO {_sql_str(str(tmp))} (FORMAT parquet, COMPRESSION {_sql_str(compression)})"
                )
            except duckdb.Error as exc:
                detail = "\n".join(str(exc).splitlines()[:4])
                raise DataValidationError(f"{src}: could not convert to parquet: {detail}") from exc
            finally:
                con.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return dst

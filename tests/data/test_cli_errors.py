"""Bad files and paths at the command line: exit code 2 and one ``persrec:`` line, never a traceback."""

import errno
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persrec.cli import main


def write_interactions(path: Path, n: int = 2000, **kwargs) -> Path:
    table = pa.table(
        {"user_id": np.arange(n) % 50, "item_id": np.arange(n) * 7 % 311, "timestamp": np.arange(n)}
    )
    pq.write_table(table, path, **kwargs)
    return path


def write_items(path: Path, **kwargs) -> Path:
    table = pa.table({"item_id": np.arange(311), "title": [f"movie number {i}" for i in range(311)]})
    pq.write_table(table, path, **kwargs)
    return path


def damage(path: Path, column: str) -> Path:
    """Overwrite bytes in the middle of a column's pages; the footer stays valid."""
    group = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(
        group.column(j) for j in range(group.num_columns) if group.column(j).path_in_schema == column
    )
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    with path.open("r+b") as fh:
        fh.seek(start + chunk.total_compressed_size // 2)
        fh.write(b"\xff" * 16)
    return path


def prepare(tmp_path: Path, *flags: str) -> list[str]:
    return ["prepare", "--output", str(tmp_path / "out"), *flags]


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("persrec:")]
    assert len(lines) == 1, err
    return lines[0]


def test_damaged_pages_name_the_file(tmp_path, capsys):
    bad = damage(write_interactions(tmp_path / "in.parquet", use_dictionary=False), "item_id")
    assert main(prepare(tmp_path, "--input", str(bad))) == 2
    line = one_error(capsys)
    assert line.startswith(f"persrec: error: {bad}: not a readable parquet file (")
    assert "corrupt or truncated" in line
    assert not (tmp_path / "out").exists()


def test_damaged_part_of_a_directory_is_found(tmp_path, capsys):
    parts = tmp_path / "parts"
    parts.mkdir()
    write_interactions(parts / "a.parquet")
    bad = damage(write_interactions(parts / "b.parquet"), "item_id")  # dictionary page: no file in the error
    write_interactions(parts / "c.parquet")
    assert main(prepare(tmp_path, "--input", str(parts))) == 2
    assert one_error(capsys).startswith(f"persrec: error: {bad}: not a readable parquet file")


def test_damaged_per_user_lists(tmp_path, capsys):
    bad = tmp_path / "lists.parquet"
    lists = [list(range(k, k + 40)) for k in range(30)]
    pq.write_table(
        pa.table({"user_id": list(range(30)), "object_id": lists, "event_time": lists}),
        bad,
        use_dictionary=False,
    )
    damage(bad, "object_id.list.element")
    assert main(prepare(tmp_path, "--input", str(bad))) == 2
    assert one_error(capsys).startswith(f"persrec: error: {bad}: not a readable parquet file")


@pytest.mark.parametrize("kind", ["truncated", "text", "empty"])
def test_not_parquet_at_all(tmp_path, capsys, kind):
    bad = tmp_path / "in.parquet"
    data = write_interactions(tmp_path / "good.parquet").read_bytes()
    bad.write_bytes(
        {"truncated": data[: len(data) // 2], "text": b"user_id,item_id\n1,2\n", "empty": b""}[kind]
    )
    assert main(prepare(tmp_path, "--input", str(bad))) == 2
    assert one_error(capsys).startswith(f"persrec: error: {bad}: not a readable parquet file")


@pytest.mark.parametrize("column", ["item_id", "title"])
def test_damaged_item_table(tmp_path, capsys, column):
    good = write_interactions(tmp_path / "in.parquet")
    bad = damage(write_items(tmp_path / "items.parquet", use_dictionary=False), column)
    assert main(prepare(tmp_path, "--input", str(good), "--items", str(bad))) == 2
    assert one_error(capsys).startswith(f"persrec: error: {bad}: not a readable parquet file")
    assert not (tmp_path / "out").exists()


def test_output_that_is_not_a_persrec_dataset(tmp_path, capsys):
    good = write_interactions(tmp_path / "in.parquet")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "data.csv").write_text("precious")
    assert main(prepare(tmp_path, "--input", str(good), "--overwrite")) == 2
    assert one_error(capsys).startswith(
        f"persrec: error: {out}: exists, is not empty and is not a prepared dataset"
    )
    assert sorted(p.name for p in out.iterdir()) == ["data.csv", "manifest.json"]
    assert (out / "data.csv").read_text() == "precious"


def test_output_in_an_unwritable_directory(tmp_path, capsys, monkeypatch):
    good = write_interactions(tmp_path / "in.parquet")
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name.startswith(".out.tmp-"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(prepare(tmp_path, "--input", str(good))) == 2
    line = one_error(capsys)
    assert line.startswith(f"persrec: error: {tmp_path / 'out'}: cannot write there, ")
    assert line.endswith("is not writable (Read-only file system); choose another output directory")


def test_drop_duplicates_flag(tmp_path, capsys):
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.table({"user_id": [1, 1, 1, 2], "item_id": [5, 5, 6, 5], "timestamp": [3, 3, 4, 3]}), src
    )
    assert main(prepare(tmp_path, "--input", str(src))) == 0
    assert one_error(capsys) == (
        f"persrec: 1 duplicate (user_id, item_id, timestamp) rows in {src.resolve()}; "
        "pass --drop_duplicates to drop them"
    )
    assert main(prepare(tmp_path, "--input", str(src), "--drop_duplicates", "--overwrite")) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_interactions"] == 3
    assert manifest["duplicates"] == {"key": ["user_id", "item_id", "timestamp"], "count": 1, "dropped": True}

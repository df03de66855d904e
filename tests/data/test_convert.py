import errno
import gzip
import os
import tempfile

import pyarrow.parquet as pq
import pytest

from persrec.cli import main
from persrec.data.convert import convert_csv_to_parquet, sniff_delimiter
from persrec.data.schema import DataValidationError

ROWS = {
    "user_id": [1, 1, 2],
    "item_id": [10, 11, 12],
    "rating": [5, 3, 4],
    "timestamp": [978300760, 978302109, 978301968],
}


def as_text(sep: str, header: bool = True) -> str:
    lines = [sep.join(ROWS)] if header else []
    lines += [sep.join(str(ROWS[c][r]) for c in ROWS) for r in range(3)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("sep", "name"), [(",", "r.csv"), ("\t", "r.tsv"), ("::", "r.dat")])
def test_round_trip_with_header(tmp_path, sep, name):
    src = tmp_path / name
    src.write_text(as_text(sep))
    out = convert_csv_to_parquet(src, tmp_path / "out.parquet")
    assert pq.read_table(out).to_pydict() == ROWS
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "out.parquet"])


def test_grouplens_dat_without_header(tmp_path):
    src = tmp_path / "ratings.dat"
    src.write_text(as_text("::", header=False))
    out = convert_csv_to_parquet(src, tmp_path / "ratings.parquet", columns=list(ROWS))
    table = pq.read_table(out)
    assert table.to_pydict() == ROWS
    assert str(table.schema.field("user_id").type) == "int64"


def test_double_colon_titles_with_quotes_and_latin1(tmp_path):
    src = tmp_path / "movies.dat"
    src.write_bytes('1::"Great" Cats (1998)::Drama\n2::Café, Le (2000)::Comedy|Drama\n'.encode("latin-1"))
    out = convert_csv_to_parquet(
        src, tmp_path / "m.parquet", columns=["item_id", "title", "genres"], encoding="latin-1"
    )
    assert pq.read_table(out).column("title").to_pylist() == ['"Great" Cats (1998)', "Café, Le (2000)"]


def test_gzip_input(tmp_path):
    src = tmp_path / "r.csv.gz"
    with gzip.open(src, "wt") as fh:
        fh.write(as_text(","))
    out = convert_csv_to_parquet(src, tmp_path / "r.parquet")
    assert pq.read_table(out).to_pydict() == ROWS


def test_encoding_outside_duckdb_is_transcoded(tmp_path):
    src = tmp_path / "r.csv"
    src.write_bytes("id,name\n1,\u20ac uro\n".encode("cp1252"))
    out = convert_csv_to_parquet(src, tmp_path / "r.parquet", encoding="cp1252")
    assert pq.read_table(out).column("name").to_pylist() == ["\u20ac uro"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".convert-")]


def test_replaces_existing_destination_only_with_overwrite(tmp_path):
    src = tmp_path / "r.csv"
    src.write_text(as_text(","))
    dst = tmp_path / "r.parquet"
    dst.write_text("old")
    with pytest.raises(FileExistsError, match=r"r\.parquet: already exists; pass --overwrite"):
        convert_csv_to_parquet(src, dst, delimiter=",")
    assert dst.read_text() == "old"
    convert_csv_to_parquet(src, dst, delimiter=",", compression="snappy", overwrite=True)
    assert pq.read_table(dst).num_rows == 3


def same_file_variants(src):
    yield src
    yield src.parent / "." / src.name
    (src.parent / "link.csv").symlink_to(src)
    yield src.parent / "link.csv"
    os.link(src, src.parent / "hard.csv")
    yield src.parent / "hard.csv"


def test_output_that_is_the_input_is_refused(tmp_path):
    src = tmp_path / "r.csv"
    src.write_text(as_text(","))
    before = src.read_bytes()
    for dst in same_file_variants(src):
        with pytest.raises(FileExistsError, match="is the input file itself"):
            convert_csv_to_parquet(src, dst, overwrite=True)
        assert src.read_bytes() == before


def test_cli_refuses_in_place_and_existing_output(tmp_path, capsys):
    src = tmp_path / "r.csv"
    src.write_text(as_text(","))
    before = src.read_bytes()
    assert main(["convert", str(src), str(src), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err == f"persrec: error: {src}: is the input file itself; choose another output path\n"
    assert src.read_bytes() == before
    dst = tmp_path / "r.parquet"
    assert main(["convert", str(src), str(dst)]) == 0
    assert main(["convert", str(src), str(dst)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"persrec: error: {dst}: already exists; pass --overwrite (overwrite=True) to replace it"
    )
    assert main(["convert", str(src), str(dst), "--overwrite"]) == 0


def test_missing_or_unwritable_output_directory(tmp_path, monkeypatch, capsys):
    src = tmp_path / "r.csv"
    src.write_text(as_text(","))
    dst = tmp_path / "missing" / "r.parquet"
    with pytest.raises(
        FileNotFoundError, match=r"r\.parquet: cannot write it, directory .*missing does not exist"
    ):
        convert_csv_to_parquet(src, dst)
    assert not dst.parent.exists()

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    dst = tmp_path / "r.parquet"
    assert main(["convert", str(src), str(dst)]) == 2
    assert capsys.readouterr().err == (
        f"persrec: error: {dst}: cannot write it, directory {tmp_path} is not writable (Read-only file system)\n"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_directory(tmp_path):
    src = tmp_path / "r.csv"
    src.write_text(as_text(","))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="is not writable"):
            convert_csv_to_parquet(src, ro / "r.parquet")
    finally:
        ro.chmod(0o755)


def test_sniff_delimiter():
    assert sniff_delimiter(["a::b::c", "1::2::3"]) == "::"
    assert sniff_delimiter(["a\tb", "1\t2"]) == "\t"
    assert sniff_delimiter(["a,b", '1,"x,y"']) == ","
    assert sniff_delimiter(["abc", "def"]) is None


def test_wrong_number_of_column_names(tmp_path):
    src = tmp_path / "ratings.dat"
    src.write_text(as_text("::", header=False))
    with pytest.raises(DataValidationError, match=r"ratings\.dat: 2 column name\(s\).*4 field\(s\)"):
        convert_csv_to_parquet(src, tmp_path / "r.parquet", columns=["a", "b"])


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        convert_csv_to_parquet(tmp_path / "nope.csv", tmp_path / "x.parquet")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataValidationError, match=r"empty\.csv: file is empty"):
        convert_csv_to_parquet(empty, tmp_path / "x.parquet")
    one_col = tmp_path / "one.csv"
    one_col.write_text("a\n1\n")
    with pytest.raises(DataValidationError, match=r"one\.csv: could not detect the delimiter"):
        convert_csv_to_parquet(one_col, tmp_path / "x.parquet")


def test_parse_error_names_file_and_leaves_nothing(tmp_path):
    src = tmp_path / "broken.csv"
    src.write_text("a,b\n1,2\n3,4,5,6\n")
    with pytest.raises(DataValidationError, match=r"broken\.csv: could not convert"):
        convert_csv_to_parquet(src, tmp_path / "x.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.csv"]

import gzip

import pyarrow.parquet as pq
import pytest

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


def test_replaces_existing_destination(tmp_path):
    src = tmp_path / "r.csv"
    src.write_text(as_text(","))
    dst = tmp_path / "r.parquet"
    dst.write_text("old")
    convert_csv_to_parquet(src, dst, delimiter=",", compression="snappy")
    assert pq.read_table(dst).num_rows == 3


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

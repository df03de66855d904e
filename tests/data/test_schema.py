from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persrec.data.schema import (
    DataValidationError,
    InputSchema,
    check_unique_keys,
    detect_layout,
    validate_interactions_file,
    validate_item_table_file,
)


def write(path: Path, data: dict, **kwargs) -> Path:
    pq.write_table(pa.table(data), path, **kwargs)
    return path


def test_schema_dict_round_trip_and_text_cols_tuple():
    schema = InputSchema(user_col="u", text_cols=["title", "genres"])
    assert schema.text_cols == ("title", "genres")
    assert InputSchema.from_dict(schema.to_dict()) == schema
    with pytest.raises(ValueError, match="bogus"):
        InputSchema.from_dict({"bogus": 1})


def test_detects_row_per_interaction_layout(tmp_path):
    f = write(tmp_path / "x.parquet", {"user_id": ["a"], "item_id": [3], "timestamp": [1.5]})
    cols = validate_interactions_file(f, InputSchema())
    assert (cols.layout, cols.user_kind, cols.item_kind, cols.time_kind) == (
        "interactions",
        "string",
        "int",
        "float",
    )


def test_detects_per_user_list_layout(tmp_path):
    f = write(tmp_path / "x.parquet", {"user_id": [1], "object_id": [[1, 2]], "event_time": [[5, 6]]})
    cols = validate_interactions_file(f, InputSchema())
    assert (cols.layout, cols.item_col, cols.time_col) == ("per_user", "object_id", "event_time")


def test_list_typed_item_col_means_per_user_layout():
    arrow = pa.schema(
        [("user_id", pa.int64()), ("item_id", pa.list_(pa.int64())), ("timestamp", pa.list_(pa.int64()))]
    )
    cols = detect_layout(arrow, InputSchema(), "f.parquet")
    assert (cols.layout, cols.item_col, cols.time_col) == ("per_user", "item_id", "timestamp")


def test_timestamp_type_accepted():
    arrow = pa.schema([("user_id", pa.int32()), ("item_id", pa.string()), ("timestamp", pa.timestamp("ms"))])
    assert detect_layout(arrow, InputSchema(), "f").time_kind == "timestamp"


def test_missing_column_names_file_column_and_suggestion(tmp_path):
    f = write(tmp_path / "ratings.parquet", {"user_id": [1], "itemid": [2], "timestamp": [3]})
    with pytest.raises(DataValidationError) as err:
        validate_interactions_file(f, InputSchema())
    msg = str(err.value)
    assert "ratings.parquet" in msg and "'item_id'" in msg and "Did you mean 'itemid'" in msg


@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        ("item_id", [1.0], "ids must be integer or string"),
        ("user_id", [True], "ids must be integer or string"),
        ("timestamp", ["2020-01-01"], "timestamps must be integer, float or timestamp"),
    ],
)
def test_wrong_dtype(tmp_path, column, values, expected):
    data = {"user_id": [1], "item_id": [2], "timestamp": [3]}
    data[column] = values
    f = write(tmp_path / "bad.parquet", data)
    with pytest.raises(DataValidationError, match=expected) as err:
        validate_interactions_file(f, InputSchema())
    assert "bad.parquet" in str(err.value) and column in str(err.value)


def test_empty_file(tmp_path):
    f = write(
        tmp_path / "empty.parquet", {"user_id": pa.array([], pa.int64()), "item_id": [], "timestamp": []}
    )
    with pytest.raises(DataValidationError, match="empty.parquet: file has no rows"):
        validate_interactions_file(f, InputSchema())


def test_nulls_found_from_statistics(tmp_path):
    f = write(tmp_path / "n.parquet", {"user_id": [1, None], "item_id": [2, 3], "timestamp": [3, 4]})
    with pytest.raises(DataValidationError, match=r"n\.parquet: column 'user_id' has 1 null"):
        validate_interactions_file(f, InputSchema())


def test_negative_ids_found_from_statistics(tmp_path):
    f = write(tmp_path / "neg.parquet", {"user_id": [1, 2], "item_id": [2, -3], "timestamp": [3, 4]})
    with pytest.raises(DataValidationError, match=r"neg\.parquet: column 'item_id' has negative id -3"):
        validate_interactions_file(f, InputSchema())


def test_mixed_list_and_scalar_columns(tmp_path):
    f = write(tmp_path / "m.parquet", {"user_id": [1], "item_id": [2], "timestamp": [[3]]})
    with pytest.raises(DataValidationError, match=r"m\.parquet: column 'timestamp' is a list"):
        validate_interactions_file(f, InputSchema())


def test_per_user_time_must_be_list(tmp_path):
    f = write(tmp_path / "p.parquet", {"user_id": [1], "object_id": [[2]], "event_time": [3]})
    with pytest.raises(DataValidationError, match=r"p\.parquet: column 'event_time'.*expected a list"):
        validate_interactions_file(f, InputSchema())


def test_not_a_parquet_file(tmp_path):
    f = tmp_path / "junk.parquet"
    f.write_text("hello")
    with pytest.raises(DataValidationError, match="junk.parquet"):
        validate_interactions_file(f, InputSchema())


def test_item_table_columns(tmp_path):
    f = write(tmp_path / "items.parquet", {"item_id": [1, 2], "title": ["a", "b"], "genre": ["x", "y"]})
    assert validate_item_table_file(f, InputSchema()) == ("int", ["title", "genre"])
    assert validate_item_table_file(f, InputSchema(text_cols=["title"])) == ("int", ["title"])
    with pytest.raises(
        DataValidationError, match=r"items\.parquet: missing item text column 'titel'.*'title'"
    ):
        validate_item_table_file(f, InputSchema(text_cols=["titel"]))
    with pytest.raises(DataValidationError, match=r"items\.parquet: missing item key column 'movie_id'"):
        validate_item_table_file(f, InputSchema(item_key_col="movie_id"))


def test_duplicate_item_keys(tmp_path):
    f = write(tmp_path / "items.parquet", {"item_id": [1, 2, 1], "title": ["a", "b", "c"]})
    with pytest.raises(
        DataValidationError, match=r"items\.parquet: column 'item_id' has 1 duplicate.*1 appears 2"
    ):
        check_unique_keys([f], "item_id")


def test_duplicate_item_keys_across_files(tmp_path):
    a = write(tmp_path / "a.parquet", {"item_id": ["x", "y"]})
    b = write(tmp_path / "b.parquet", {"item_id": ["z", "x"]})
    with pytest.raises(DataValidationError, match=r"a\.parquet, .*b\.parquet: column 'item_id'"):
        check_unique_keys([a, b], "item_id")
    check_unique_keys([a], "item_id")

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persrec.data.prepare import prepare_dataset
from persrec.data.schema import DataValidationError
from persrec.data.store import PreparedDataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    src = root / "in.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": [5, 5, 5, 9, 7, 7],
                "item_id": ["b", "a", "c", "a", "c", "c"],
                "timestamp": [3, 1, 2, 8, 4, 6],
            }
        ),
        src,
    )
    return prepare_dataset(src, root / "ds", progress=False).path


@pytest.fixture
def copy(prepared, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(prepared, dst)
    return dst


def test_accessors(prepared):
    ds = PreparedDataset.open(prepared)
    assert (len(ds), ds.num_users, ds.num_items, ds.num_interactions, ds.max_history) == (3, 3, 3, 6, 3)
    assert ds.offsets.tolist() == [0, 3, 5, 6]
    assert ds.lengths().tolist() == [3, 2, 1] and ds.lengths().dtype == np.int64
    assert ds.history(0).tolist() == [1, 3, 2]  # user 5: a@1, c@2, b@3 (items a=1, b=2, c=3)
    assert ds.history_timestamps(0).tolist() == [1, 2, 3]
    assert ds.history(1).tolist() == [3, 3] and ds.history(2).tolist() == [1]
    assert isinstance(ds.history(0), np.memmap)
    assert ds.item_frequencies().tolist() == [0, 2, 1, 3]
    assert ds.item_table() is None
    assert "users=3" in repr(ds) and "interactions=6" in repr(ds)
    with pytest.raises(IndexError):
        ds.history(3)
    with pytest.raises(IndexError):
        ds.history(-1)


def test_history_is_read_only(prepared):
    ds = PreparedDataset.open(prepared)
    with pytest.raises(ValueError):
        ds.history(0)[0] = 7


def test_pickles_by_path(prepared):
    ds = PreparedDataset.open(prepared)
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    again = pickle.loads(blob)
    assert again.history(0).tolist() == ds.history(0).tolist()


def save_like(path: Path, values) -> None:
    np.save(path, np.asarray(values))


def rewrite_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("corrupt", "file", "expected"),
    [
        (
            lambda p: save_like(p / "offsets.npy", np.array([0, 4, 3, 6], np.int64)),
            "offsets.npy",
            "non-decreasing",
        ),
        (
            lambda p: save_like(p / "offsets.npy", np.array([1, 3, 5, 6], np.int64)),
            "offsets.npy",
            r"offsets\[0\]",
        ),
        (
            lambda p: save_like(p / "offsets.npy", np.array([0, 3, 5, 5], np.int64)),
            "offsets.npy",
            r"offsets\[-1\]",
        ),
        (lambda p: save_like(p / "offsets.npy", np.array([0, 3, 6], np.int64)), "offsets.npy", "shape"),
        (
            lambda p: save_like(p / "items.npy", np.array([1, 2, 3, 3, 4, 1], np.int32)),
            "items.npy",
            r"outside \[1, 3\]",
        ),
        (
            lambda p: save_like(p / "items.npy", np.array([1, 2, 0, 3, 3, 1], np.int32)),
            "items.npy",
            "item id 0",
        ),
        (lambda p: save_like(p / "items.npy", np.array([1, 2, 3, 3, 3, 1], np.int64)), "items.npy", "dtype"),
        (lambda p: save_like(p / "timestamps.npy", np.zeros(6, np.float64)), "timestamps.npy", "dtype"),
        (lambda p: (p / "timestamps.npy").unlink(), "timestamps.npy", "missing"),
        (lambda p: (p / "items.npy").write_bytes(b"junk"), "items.npy", "not a readable"),
        (lambda p: (p / "item_ids.parquet").unlink(), "item_ids.parquet", "missing"),
        (lambda p: rewrite_manifest(p, max_history=2), "offsets.npy", "max_history=2"),
        (lambda p: rewrite_manifest(p, format_version=99), "manifest.json", "format_version 99"),
        (lambda p: rewrite_manifest(p, has_item_table=True), "items.parquet", "missing"),
        (lambda p: (p / "manifest.json").write_text("{"), "manifest.json", "not valid JSON"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json", "not a prepared dataset"),
    ],
)
def test_open_detects_corruption(copy, corrupt, file, expected):
    corrupt(copy)
    with pytest.raises(DataValidationError, match=expected) as err:
        PreparedDataset.open(copy)
    assert file in str(err.value)


def test_id_map_row_count_checked(copy):
    pq.write_table(
        pa.table({"user_idx": pa.array([0], pa.int32()), "user_id": [5]}), copy / "user_ids.parquet"
    )
    with pytest.raises(DataValidationError, match=r"user_ids\.parquet: has 1 rows, expected 3"):
        PreparedDataset.open(copy)


def test_fast_open_skips_item_scan(copy):
    save_like(copy / "items.npy", np.array([1, 2, 3, 3, 9, 1], np.int32))
    assert PreparedDataset.open(copy, full_check=False).num_items == 3


def test_not_a_directory(tmp_path):
    with pytest.raises(DataValidationError, match="not a prepared dataset directory"):
        PreparedDataset.open(tmp_path / "missing")


def test_unsorted_timestamps_name_the_user(copy):
    # user_idx 1 is original user 7 with times [4, 6]; swapping them breaks its order only.
    save_like(copy / "timestamps.npy", np.array([1, 2, 3, 6, 4, 8], np.int64))
    with pytest.raises(DataValidationError) as err:
        PreparedDataset.open(copy)
    assert str(err.value) == (
        f"{copy / 'timestamps.npy'}: timestamps of user_idx 1 (user id 7) are not sorted "
        "(history position 1: 4 after 6); prepare the dataset again"
    )
    assert PreparedDataset.open(copy, full_check=False).num_interactions == 6


def test_time_may_drop_where_a_user_starts(copy):
    save_like(copy / "timestamps.npy", np.array([7, 8, 9, 1, 2, 0], np.int64))
    assert PreparedDataset.open(copy).history_timestamps(1).tolist() == [1, 2]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_time_order_check_across_chunks(copy, monkeypatch, chunk):
    import persrec.data.store as store_mod

    monkeypatch.setattr(store_mod, "SCAN_CHUNK", chunk)
    save_like(copy / "timestamps.npy", np.array([7, 8, 9, 1, 2, 0], np.int64))
    PreparedDataset.open(copy)
    save_like(copy / "timestamps.npy", np.array([1, 3, 2, 4, 6, 8], np.int64))
    with pytest.raises(DataValidationError, match=r"user_idx 0 \(user id 5\) .*position 2: 2 after 3"):
        PreparedDataset.open(copy)

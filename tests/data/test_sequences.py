"""Leave-one-out windows: which items are inputs and targets, slicing, padding, and stale-history gaps."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persrec.data.prepare import prepare_dataset
from persrec.data.sequences import EvalSequences, TrainSequences, WindowConfig, collate


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    # user 0: items 1..10 at times 1..10 (ids as given, dense ids keep first-seen order or id order);
    # user 1: 2 interactions (too short for leave-one-out)
    rows = [(0, i, i) for i in range(1, 11)] + [(1, 3, 1), (1, 4, 2)]
    table = pa.table(
        {"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows], "timestamp": [r[2] for r in rows]}
    )
    pq.write_table(table, root / "x.parquet")
    return prepare_dataset(root / "x.parquet", root / "prepared", progress=False)


def _original(store, dense: np.ndarray) -> list[int]:
    ids = store.item_id_map().column("item_id").to_numpy()
    return [int(ids[d - 1]) if d else 0 for d in dense]


def test_train_window_excludes_held_out_items_and_left_pads(store):
    data = TrainSequences(store, WindowConfig(max_length=10))
    assert len(data) == 1  # the 2-item user is not trained on
    example = data[0]
    assert _original(store, example["input_ids"].numpy()) == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert _original(store, example["target_ids"].numpy()) == [0, 0, 0, 2, 3, 4, 5, 6, 7, 8]
    assert example["timestamps"].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]


def test_without_validation_split_the_second_to_last_item_is_trained_on(store):
    example = TrainSequences(store, WindowConfig(max_length=10), held_out=1)[0]
    assert _original(store, example["input_ids"].numpy()) == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert _original(store, example["target_ids"].numpy()) == [0, 0, 2, 3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="held_out"):
        TrainSequences(store, WindowConfig(max_length=10), held_out=0)


def test_eval_targets_are_second_to_last_and_last(store):
    window = WindowConfig(max_length=4)
    valid, test = EvalSequences(store, "valid", window, with_seen=True), EvalSequences(store, "test", window)
    assert _original(store, [int(valid[0]["target"])]) == [9]
    assert _original(store, valid[0]["input_ids"].numpy()) == [5, 6, 7, 8]
    assert _original(store, valid[0]["seen"].numpy()) == list(range(1, 9))
    assert _original(store, [int(test[0]["target"])]) == [10]
    assert _original(store, test[0]["input_ids"].numpy()) == [6, 7, 8, 9]


def test_authors_slicing_positions(store):
    # load the last 6 items up to the target, keep positions 2..5 of them: inputs 3 items + target
    window = WindowConfig(max_length=4, feature_max_length=6, start_position=2, end_position=5)
    test = EvalSequences(store, "test", window)
    assert _original(store, test[0]["input_ids"].numpy()) == [0, 7, 8, 9]
    # end position before the last loaded item moves the target earlier
    window = WindowConfig(max_length=4, feature_max_length=6, start_position=0, end_position=3)
    assert _original(store, [int(EvalSequences(store, "test", window)[0]["target"])]) == [8]


@pytest.mark.parametrize(
    "kwargs", [dict(max_length=0), dict(max_length=4, start_position=5), dict(max_length=4, end_position=9)]
)
def test_bad_windows_are_rejected(kwargs):
    with pytest.raises(ValueError):
        WindowConfig(**kwargs)


def test_stale_gap_skips_items_before_the_recent_window(store):
    window = WindowConfig(max_length=6)
    stale = EvalSequences(store, "test", window, stale_gap=(2, 3))
    # target 10, recent inputs 8, 9; the 3 items 5, 6, 7 are skipped; older history 1..4 fills the rest
    assert _original(store, stale[0]["input_ids"].numpy()) == [1, 2, 3, 4, 8, 9]
    assert stale[0]["timestamps"].tolist() == [1, 2, 3, 4, 8, 9]


def test_collate_pads_seen_lists(store):
    data = EvalSequences(store, "test", WindowConfig(max_length=4), with_seen=True)
    batch = collate([data[0], data[0]])
    assert batch["input_ids"].shape == (2, 4) and batch["seen"].shape == (2, 9)

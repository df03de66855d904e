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


# ---- item_start_position / item_end_position for histories shorter than, equal to and longer than the load ----

LENGTHS = {
    "short": 3,
    "exact": 6,
    "long": 12,
}  # the load below is 6 slots; "exact" fills it for the test item


@pytest.fixture(scope="module")
def sized_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("sized")
    rows = []
    for user, n in enumerate(LENGTHS.values()):
        rows += [(user, 100 * (user + 1) + k, k) for k in range(1, n + 1)]
    table = pa.table(
        {name: [r[i] for r in rows] for i, name in enumerate(["user_id", "item_id", "timestamp"])}
    )
    pq.write_table(table, root / "x.parquet")
    return prepare_dataset(root / "x.parquet", root / "prepared", progress=False)


def _examples(store, data) -> dict[str, dict]:
    """Examples by history size, with original item ids."""
    names = list(LENGTHS)
    out = {}
    for index in range(len(data)):
        example = data[index]
        entry = {"input": _original(store, example["input_ids"].numpy())}
        if "target" in example:
            entry["target"] = _original(store, [int(example["target"])])[0]
        else:
            entry["targets"] = _original(store, example["target_ids"].numpy())
        out[names[int(example["user"])]] = entry
    return out


def test_slots_count_in_the_left_padded_load_for_every_history_length(sized_store):
    # load 6 slots up to the target, keep slots 1..4; a short history fills the last slots of the load
    window = WindowConfig(max_length=4, feature_max_length=6, start_position=1, end_position=4)
    test = _examples(sized_store, EvalSequences(sized_store, "test", window))
    # short (101..103): slots [_, _, _, 101, 102, 103] -> kept [_, _, 101, 102]
    assert test["short"] == {"input": [0, 0, 0, 101], "target": 102}
    # exact (201..206): slots [201 .. 206] -> kept [202 .. 205]
    assert test["exact"] == {"input": [0, 202, 203, 204], "target": 205}
    # long (301..312): slots [307 .. 312] -> kept [308 .. 311]
    assert test["long"] == {"input": [0, 308, 309, 310], "target": 311}
    valid = _examples(sized_store, EvalSequences(sized_store, "valid", window))
    assert valid["short"] == {"input": [0, 0, 0, 0], "target": 101}  # slots [_, _, _, _, 101, 102]
    assert valid["exact"] == {"input": [0, 201, 202, 203], "target": 204}
    assert valid["long"] == {"input": [0, 307, 308, 309], "target": 310}
    train = _examples(sized_store, TrainSequences(sized_store, window))
    assert train["short"] == {"input": [0, 0, 0, 0], "targets": [0, 0, 0, 0]}  # slots [_, _, _, _, _, 101]
    assert train["exact"] == {"input": [0, 0, 201, 202], "targets": [0, 0, 202, 203]}
    assert train["long"] == {"input": [0, 306, 307, 308], "targets": [0, 307, 308, 309]}


def test_a_history_whose_target_slot_is_padding_has_no_example(sized_store):
    window = WindowConfig(max_length=4, feature_max_length=6, start_position=0, end_position=3)
    # valid, short: slots [_, _, _, _, 101, 102]: slot 3 (the target) is padding
    valid = EvalSequences(sized_store, "valid", window)
    assert sorted(_examples(sized_store, valid)) == ["exact", "long"] and len(valid) == 2
    # test, short: slot 3 holds 101, the target, with nothing before it
    test = _examples(sized_store, EvalSequences(sized_store, "test", window))
    assert test["short"] == {"input": [0, 0, 0, 0], "target": 101}
    assert test["exact"] == {"input": [0, 201, 202, 203], "target": 204}
    assert len(TrainSequences(sized_store, window)) == 3  # an example without targets trains nothing


def _reference(history: list[int], end: int, window: WindowConfig) -> list[int]:
    """The kept slots of the explicitly left-padded load (0 = padding)."""
    load = window.loaded_length
    padded = [0] * max(0, load - end) + history[max(0, end - load) : end]
    return padded[window.start_position : window.last_slot + 1]


def _left(values: list[int], length: int) -> list[int]:
    values = values[-length:] if values else []
    return [0] * (length - len(values)) + values


@pytest.mark.parametrize(
    "window",
    [
        WindowConfig(max_length=4),
        WindowConfig(max_length=3, feature_max_length=8),
        WindowConfig(max_length=4, feature_max_length=6, start_position=2),
        WindowConfig(max_length=5, feature_max_length=7, start_position=1, end_position=5),
        WindowConfig(max_length=2, feature_max_length=5, start_position=0, end_position=2),
    ],
)
def test_windows_equal_the_explicitly_padded_load(sized_store, window):
    histories = {
        name: [100 * (u + 1) + k for k in range(1, n + 1)] for u, (name, n) in enumerate(LENGTHS.items())
    }
    for split, held_out in [("valid", 2), ("test", 1)]:
        examples = _examples(sized_store, EvalSequences(sized_store, split, window))
        for name, history in histories.items():
            kept = _reference(history, len(history) - held_out + 1, window)
            if kept[-1] == 0:
                assert name not in examples
                continue
            real = [item for item in kept if item]
            assert examples[name] == {"input": _left(real[:-1], window.max_length), "target": real[-1]}
    train = _examples(sized_store, TrainSequences(sized_store, window))
    for name, history in histories.items():
        real = [item for item in _reference(history, len(history) - 2, window) if item]
        expected = {
            "input": _left(real[:-1], window.max_length),
            "targets": _left(real[1:], window.max_length),
        }
        assert train[name] == expected

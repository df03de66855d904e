import errno
import json
import os
import random
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import persrec.data.writers as writers_mod
from persrec.data.prepare import PrepareOptions, owned_files, prepare_dataset, resolve_parquet_files
from persrec.data.schema import DataValidationError, InputSchema

# user, item, time; user 20 has two equal timestamps whose input order must survive.
ROWS = [
    (20, 7, 100),
    (10, 5, 300),
    (20, 3, 50),
    (10, 7, 200),
    (20, 9, 100),
    (30, 5, 10),
]


INT64 = pa.int64()


def write_rows(path: Path, rows, user_type=INT64, item_type=INT64, **kwargs) -> Path:
    users, items, times = zip(*rows, strict=True) if rows else ([], [], [])
    table = pa.table(
        {
            "user_id": pa.array(users, user_type),
            "item_id": pa.array(items, item_type),
            "timestamp": pa.array(times, pa.int64()),
        }
    )
    pq.write_table(table, path, **kwargs)
    return path


def write_lists(path: Path, rows) -> Path:
    """Per-user layout: one row per user with parallel lists, in input order."""
    by_user: dict = {}
    for u, i, t in rows:
        by_user.setdefault(u, ([], []))
        by_user[u][0].append(i)
        by_user[u][1].append(t)
    pq.write_table(
        pa.table(
            {
                "user_id": list(by_user),
                "object_id": [v[0] for v in by_user.values()],
                "event_time": [v[1] for v in by_user.values()],
            }
        ),
        path,
    )
    return path


def run(src, out, **kwargs):
    kwargs.setdefault("progress", False)
    return prepare_dataset(src, out, **kwargs)


def histories(ds) -> dict:
    """{original user: [(original item, time), ...]} decoded through the id maps."""
    users = ds.user_id_map().column("user_id").to_pylist()
    items = [None] + ds.item_id_map().column("item_id").to_pylist()
    return {
        users[u]: [(items[i], int(t)) for i, t in zip(ds.history(u), ds.history_timestamps(u), strict=True)]
        for u in range(ds.num_users)
    }


def store_files(path: Path) -> dict:
    out = {}
    for name in ("offsets.npy", "items.npy", "timestamps.npy"):
        out[name] = np.load(path / name).tolist()
    for name in ("item_ids.parquet", "user_ids.parquet"):
        out[name] = pq.read_table(path / name).to_pydict()
    return out


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_basic_store(tmp_path):
    ds = run(write_rows(tmp_path / "in.parquet", ROWS), tmp_path / "out")
    assert (ds.num_users, ds.num_items, ds.num_interactions, ds.max_history) == (3, 4, 6, 3)
    assert histories(ds) == {
        10: [(7, 200), (5, 300)],
        20: [(3, 50), (7, 100), (9, 100)],
        30: [(5, 10)],
    }
    # dense ids follow the sorted original ids; 0 is never stored
    assert ds.item_id_map().to_pydict() == {"item_idx": [1, 2, 3, 4], "item_id": [3, 5, 7, 9]}
    assert ds.user_id_map().to_pydict() == {"user_idx": [0, 1, 2], "user_id": [10, 20, 30]}
    assert ds.items.dtype == np.int32 and ds.timestamps.dtype == np.int64 and ds.offsets.dtype == np.int64
    assert isinstance(ds.items, np.memmap)
    assert ds.item_frequencies().tolist() == [0, 1, 2, 2, 1]
    m = ds.manifest
    assert (
        m["format_version"] == 1 and m["has_item_table"] is False and m["schema"]["layout"] == "interactions"
    )
    assert m["filters"] == {"min_user_interactions": 0, "min_item_interactions": 0}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "item_ids.parquet",
        "items.npy",
        "manifest.json",
        "offsets.npy",
        "timestamps.npy",
        "user_ids.parquet",
    ]
    assert leftovers(tmp_path) == []


def test_both_layouts_give_identical_stores(tmp_path):
    a = run(write_rows(tmp_path / "rows.parquet", ROWS), tmp_path / "a")
    b = run(write_lists(tmp_path / "lists.parquet", ROWS), tmp_path / "b")
    assert b.manifest["schema"]["layout"] == "per_user"
    assert store_files(a.path) == store_files(b.path)


def test_string_ids(tmp_path):
    rows = [(f"u{u}", f"i{i}", t) for u, i, t in ROWS]
    ds = run(write_rows(tmp_path / "in.parquet", rows, pa.string(), pa.string()), tmp_path / "out")
    assert ds.item_id_map().column("item_id").to_pylist() == ["i3", "i5", "i7", "i9"]
    assert ds.item_id_map().schema.field("item_id").type == pa.string()
    assert histories(ds)["u20"] == [("i3", 50), ("i7", 100), ("i9", 100)]


def test_equal_timestamps_keep_input_order_across_files(tmp_path):
    rows = [(1, item, 5) for item in (9, 2, 7, 4, 8, 1)]
    d = tmp_path / "parts"
    d.mkdir()
    write_rows(d / "part-0.parquet", rows[:3], row_group_size=2)
    write_rows(d / "part-1.parquet", rows[3:])
    write_rows(d / "part-2.parquet", [])  # empty parts are skipped
    ds = run(d, tmp_path / "out")
    assert [i for i, _ in histories(ds)[1]] == [9, 2, 7, 4, 8, 1]


def test_kcore_filter_is_iterative(tmp_path):
    # 2-core. Item 99 is seen once, so it goes; that leaves user 3 with one interaction, so
    # user 3 goes; that leaves item 50 with one interaction, so it goes too.
    rows = [
        (1, 10, 1), (1, 20, 2), (2, 10, 3), (2, 20, 4),
        (3, 99, 5), (3, 50, 6), (4, 50, 7), (4, 10, 8), (4, 20, 9),
    ]  # fmt: skip
    opts = PrepareOptions(min_user_interactions=2, min_item_interactions=2)
    ds = run(write_rows(tmp_path / "in.parquet", rows), tmp_path / "out", options=opts)
    assert histories(ds) == {1: [(10, 1), (20, 2)], 2: [(10, 3), (20, 4)], 4: [(10, 8), (20, 9)]}
    assert ds.item_id_map().column("item_id").to_pylist() == [10, 20]
    assert ds.manifest["filters"] == {"min_user_interactions": 2, "min_item_interactions": 2}


def test_empty_after_filtering(tmp_path):
    src = write_rows(tmp_path / "in.parquet", ROWS)
    with pytest.raises(DataValidationError, match=r"in\.parquet: no interactions left after filtering"):
        run(src, tmp_path / "out", options=PrepareOptions(min_user_interactions=50))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_item_table_is_keyed_by_id_not_position(tmp_path):
    rows = [(1, 3, 1), (1, 1, 2), (2, 2, 3), (2, 3, 4), (3, 5, 1)]
    catalog = [(1, "one"), (2, "two"), (3, "three"), (4, "four, never seen"), (6, "six")]
    random.Random(0).shuffle(catalog)
    items_file = tmp_path / "items.parquet"
    pq.write_table(
        pa.table({"item_id": [c[0] for c in catalog], "title": [c[1] for c in catalog]}), items_file
    )
    ds = run(write_rows(tmp_path / "in.parquet", rows), tmp_path / "out", items=items_file)
    table = ds.item_table()
    assert table.to_pydict() == {
        "item_idx": [1, 2, 3, 4],
        "item_id": [1, 2, 3, 5],
        "title": ["one", "two", "three", None],
    }
    assert table.schema.field("item_idx").type == pa.int32()
    assert ds.manifest["has_item_table"] is True


def test_item_table_drops_filtered_items_and_selects_text_columns(tmp_path):
    rows = [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4), (3, 3, 5)]
    items_file = tmp_path / "items.parquet"
    pq.write_table(pa.table({"movie": [3, 2, 1], "title": ["c", "b", "a"], "junk": [0, 0, 0]}), items_file)
    opts = PrepareOptions(
        schema=InputSchema(item_key_col="movie", text_cols=["title"]),
        min_user_interactions=2,
        min_item_interactions=2,
    )
    ds = run(write_rows(tmp_path / "in.parquet", rows), tmp_path / "out", items=items_file, options=opts)
    assert ds.item_table().to_pydict() == {"item_idx": [1, 2], "item_id": [1, 2], "title": ["a", "b"]}


def test_item_table_errors(tmp_path):
    src = write_rows(tmp_path / "in.parquet", ROWS)
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"item_id": [5, 5], "title": ["a", "b"]}), dup)
    with pytest.raises(DataValidationError, match=r"dup\.parquet: column 'item_id' has 1 duplicate"):
        run(src, tmp_path / "out", items=dup)
    strings = tmp_path / "str.parquet"
    pq.write_table(pa.table({"item_id": ["5"], "title": ["a"]}), strings)
    with pytest.raises(DataValidationError, match=r"str\.parquet: column 'item_id' holds string keys"):
        run(src, tmp_path / "out", items=strings)
    assert not (tmp_path / "out").exists()


def test_timestamp_and_float_times_become_epoch_seconds(tmp_path):
    base = datetime(2021, 5, 1, tzinfo=timezone.utc)
    epoch = int(base.timestamp())
    ts = [base.replace(microsecond=900_000), base.replace(second=1), base.replace(microsecond=100_000)]
    f = tmp_path / "ts.parquet"
    pq.write_table(
        pa.table({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "timestamp": pa.array(ts, pa.timestamp("us"))}),
        f,
    )
    ds = run(f, tmp_path / "a")
    # sorted at full precision (item 3 at .1s before item 1 at .9s), stored floored to seconds
    assert histories(ds)[1] == [(3, epoch), (1, epoch), (2, epoch + 1)]
    tz = tmp_path / "tz.parquet"
    stamps = pa.array([base.replace(second=5), base], pa.timestamp("ns", tz="Europe/Paris"))
    pq.write_table(pa.table({"user_id": [1, 1], "item_id": [1, 2], "timestamp": stamps}), tz)
    assert histories(run(tz, tmp_path / "tz"))[1] == [(2, epoch), (1, epoch + 5)]
    ns = tmp_path / "ns.parquet"
    stamps = pa.array([epoch * 10**9 + 999_999_999, epoch * 10**9], pa.int64()).cast(pa.timestamp("ns"))
    pq.write_table(pa.table({"user_id": [1, 1], "item_id": [1, 2], "timestamp": stamps}), ns)
    assert histories(run(ns, tmp_path / "ns"))[1] == [(2, epoch), (1, epoch)]
    g = tmp_path / "float.parquet"
    pq.write_table(pa.table({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [7.9, 7.2]}), g)
    assert histories(run(g, tmp_path / "b"))[1] == [(2, 7), (1, 7)]


def test_glob_and_directory_inputs(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    write_rows(d / "a.parquet", ROWS[:3])
    write_rows(d / "sub" / "b.parquet", ROWS[3:])
    (d / "_SUCCESS").write_text("")
    write_rows(d / ".hidden.parquet", [(1, 1, 1)])
    assert [p.name for p in resolve_parquet_files(d)] == ["a.parquet", "b.parquet"]
    assert [p.name for p in resolve_parquet_files(d / "*.parquet")] == ["a.parquet"]
    whole = run(write_rows(tmp_path / "all.parquet", ROWS), tmp_path / "x")
    split = run(d, tmp_path / "y")
    assert store_files(whole.path) == store_files(split.path)
    with pytest.raises(FileNotFoundError, match="nothing"):
        resolve_parquet_files(tmp_path / "nothing*.parquet")


def test_rerun_is_a_noop_and_changes_need_overwrite(tmp_path, capsys):
    src = write_rows(tmp_path / "in.parquet", ROWS)
    out = tmp_path / "out"
    run(src, out)
    before = (out / "manifest.json").stat().st_mtime_ns
    ds = run(src, out, progress=True, options=PrepareOptions(memory_limit="1GB", threads=1))
    assert "up to date" in capsys.readouterr().err
    assert (out / "manifest.json").stat().st_mtime_ns == before and ds.num_interactions == 6

    write_rows(src, ROWS[:4])
    os.utime(src, ns=(before + 10**9, before + 10**9))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        run(src, out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        run(src, out, options=PrepareOptions(min_user_interactions=2))
    ds = run(src, out, overwrite=True)
    assert ds.num_interactions == 4 and leftovers(tmp_path) == []


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        run(write_rows(tmp_path / "in.parquet", ROWS), out, overwrite=True)
    assert (out / "notes.txt").exists()


def test_manifest_marks_the_directory_and_lists_its_files(tmp_path):
    ds = run(write_rows(tmp_path / "in.parquet", ROWS), tmp_path / "out")
    assert ds.manifest["format"] == "persrec-prepared-dataset"
    assert ds.manifest["files"] == sorted(p.name for p in ds.path.iterdir())
    assert owned_files(ds.path) == set(ds.manifest["files"])


def test_overwrite_keeps_a_users_manifest_and_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    (out / "index.html").write_text("<html></html>")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="not a prepared dataset written by persrec") as err:
        run(write_rows(tmp_path / "in.parquet", ROWS), out, overwrite=True)
    assert str(out) in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(tmp_path) == []


def changed_input(tmp_path: Path) -> Path:
    """An input whose content and mtime differ from the one ``out`` was prepared from."""
    src = write_rows(tmp_path / "in.parquet", ROWS)
    run(src, tmp_path / "out")
    write_rows(src, ROWS[:4])
    stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns + 10**9
    os.utime(src, ns=(stamp, stamp))
    return src


def test_overwrite_refuses_a_dataset_holding_a_foreign_file(tmp_path):
    src = changed_input(tmp_path)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "plots").mkdir()
    with pytest.raises(FileExistsError, match=r"holds .*notes\.txt, which persrec did not write"):
        run(src, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_interactions"] == 6
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_only_persrecs_files(tmp_path):
    src = changed_input(tmp_path)
    ds = run(src, tmp_path / "out", overwrite=True)
    assert ds.num_interactions == 4 and leftovers(tmp_path) == []


def test_dataset_written_before_the_marker_is_still_replaceable(tmp_path):
    src = changed_input(tmp_path)
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["format"], manifest["files"]
    manifest_path.write_text(json.dumps(manifest))
    assert owned_files(tmp_path / "out") is not None
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        run(src, tmp_path / "out", overwrite=True)
    (tmp_path / "out" / "notes.txt").unlink()
    assert run(src, tmp_path / "out", overwrite=True).num_interactions == 4


@pytest.mark.parametrize("files", [["../in.parquet"], ["a/b"], "items.npy", [7]])
def test_a_manifest_listing_paths_outside_is_not_persrecs(tmp_path, files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "persrec-prepared-dataset", "files": files}))
    assert owned_files(out) is None


def test_file_added_during_the_build_is_kept(tmp_path, monkeypatch):
    src = changed_input(tmp_path)
    real = writers_mod.write_histories

    def write_and_intrude(*args, **kwargs):
        (tmp_path / "out" / "late.txt").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(writers_mod, "write_histories", write_and_intrude)
    with pytest.raises(FileExistsError, match=r"late\.txt"):
        run(src, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "late.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_replacing_deletes_only_listed_files(tmp_path, monkeypatch, capsys):
    import persrec.data.prepare as prepare_mod

    src = changed_input(tmp_path)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    monkeypatch.setattr(prepare_mod, "_check_replaceable", lambda output: None)  # as if added too late
    assert run(src, tmp_path / "out", overwrite=True).num_interactions == 4
    kept = tmp_path / f".out.old-{os.getpid()}"
    assert [p.name for p in kept.iterdir()] == ["notes.txt"] and (kept / "notes.txt").read_text() == "mine"
    assert (
        f"persrec: kept {kept}, the replaced dataset: could not remove notes.txt" in capsys.readouterr().err
    )


def test_stale_replaced_dataset_keeps_foreign_files(tmp_path):
    run(write_rows(tmp_path / "in.parquet", ROWS), tmp_path / "ds")
    stale = tmp_path / ".out.old-999999999"
    (tmp_path / "ds").rename(stale)
    (stale / "notes.txt").write_text("mine")
    run(tmp_path / "in.parquet", tmp_path / "out")
    assert sorted(p.name for p in stale.iterdir()) == ["notes.txt"]


def test_empty_output_directory_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    assert run(write_rows(tmp_path / "in.parquet", ROWS), tmp_path / "out").num_interactions == 6


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(FileExistsError, match="not a directory"):
        run(write_rows(tmp_path / "in.parquet", ROWS), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out").read_text() == "mine"


def test_unwritable_parent_is_named(tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name.startswith(".out.tmp-"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(PermissionError, match=r"out: cannot write there, .* is not writable") as err:
        run(write_rows(tmp_path / "in.parquet", ROWS), tmp_path / "out")
    assert str(tmp_path / "out") in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_is_named(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="is not writable"):
            run(write_rows(tmp_path / "in.parquet", ROWS), parent / "out")
    finally:
        parent.chmod(0o755)


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    src = write_rows(tmp_path / "in.parquet", ROWS)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(writers_mod, "_stream_histories", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failure_during_overwrite_keeps_old_dataset(tmp_path, monkeypatch):
    src = write_rows(tmp_path / "in.parquet", ROWS)
    run(src, tmp_path / "out")
    monkeypatch.setattr(writers_mod, "write_item_table", lambda *a, **k: 1 / 0)
    items_file = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": [5], "title": ["x"]}), items_file)
    with pytest.raises(ZeroDivisionError):
        run(src, tmp_path / "out", items=items_file, overwrite=True)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["has_item_table"] is False
    assert leftovers(tmp_path) == []


def test_stale_build_of_dead_process_is_removed(tmp_path):
    stale = tmp_path / ".out.tmp-999999999"
    stale.mkdir()
    run(write_rows(tmp_path / "in.parquet", ROWS), tmp_path / "out")
    assert not stale.exists()


def test_external_temp_dir_is_cleaned(tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    run(write_rows(tmp_path / "in.parquet", ROWS), tmp_path / "out", options=PrepareOptions(temp_dir=spill))
    assert list(spill.iterdir()) == []


# ----------------------------------------------------------------------------------------- duplicates

# (user, item, time): user 1 repeats (5, 10) twice more, user 2 repeats (7, 20) once; (1, 5, 11) differs.
DUPLICATED = [(1, 5, 10), (1, 6, 10), (1, 5, 10), (2, 7, 20), (1, 5, 11), (2, 7, 20), (1, 5, 10)]


@pytest.mark.parametrize("layout", [write_rows, write_lists])
def test_duplicates_are_counted_and_kept_by_default(tmp_path, capsys, layout):
    src = layout(tmp_path / "in.parquet", DUPLICATED)
    ds = run(src, tmp_path / "out")
    err = capsys.readouterr().err.strip().splitlines()
    key = "(user_id, item_id, timestamp)" if layout is write_rows else "(user_id, object_id, event_time)"
    assert err == [f"persrec: 3 duplicate {key} rows in {src}; pass --drop_duplicates to drop them"]
    assert ds.num_interactions == 7
    assert ds.manifest["duplicates"] == {"key": list(key[1:-1].split(", ")), "count": 3, "dropped": False}


@pytest.mark.parametrize("layout", [write_rows, write_lists])
def test_drop_duplicates_keeps_the_first_of_each(tmp_path, capsys, layout):
    src = layout(tmp_path / "in.parquet", DUPLICATED)
    ds = run(src, tmp_path / "out", options=PrepareOptions(drop_duplicates=True))
    assert "persrec: dropped 3 duplicate" in capsys.readouterr().err
    assert ds.num_interactions == 4 and ds.manifest["duplicates"]["dropped"] is True
    assert ds.manifest["duplicates"]["count"] == 3
    assert histories(ds) == {1: [(5, 10), (6, 10), (5, 11)], 2: [(7, 20)]}


def test_no_duplicates_no_message(tmp_path, capsys):
    ds = run(write_rows(tmp_path / "in.parquet", ROWS), tmp_path / "out")
    assert capsys.readouterr().err == "" and ds.manifest["duplicates"]["count"] == 0


def test_duplicates_across_files_and_before_the_kcore(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    write_rows(d / "a.parquet", [(1, 5, 10), (1, 6, 20), (2, 6, 30)])
    write_rows(d / "b.parquet", [(1, 5, 10), (2, 5, 40)])
    kept = run(d, tmp_path / "kept", options=PrepareOptions(min_item_interactions=3))
    assert "1 duplicate" in capsys.readouterr().err and histories(kept) == {
        1: [(5, 10), (5, 10)],
        2: [(5, 40)],
    }
    dropped = PrepareOptions(min_item_interactions=3, drop_duplicates=True)
    with pytest.raises(DataValidationError, match="no interactions left"):
        run(d, tmp_path / "dropped", options=dropped)


def test_drop_duplicates_is_part_of_the_fingerprint(tmp_path):
    src = write_rows(tmp_path / "in.parquet", DUPLICATED)
    run(src, tmp_path / "out")
    assert "drop_duplicates" not in PrepareOptions().result_key()  # older datasets stay up to date
    with pytest.raises(FileExistsError, match="different input or options"):
        run(src, tmp_path / "out", options=PrepareOptions(drop_duplicates=True))
    ds = run(src, tmp_path / "out", options=PrepareOptions(drop_duplicates=True), overwrite=True)
    assert ds.num_interactions == 4


# ----------------------------------------------------------------------------------------- bad input


def no_stats(path: Path, table: pa.Table) -> Path:
    """Written without statistics so only the full scan in prepare can find the problem."""
    pq.write_table(table, path, write_statistics=False)
    return path


@pytest.mark.parametrize(
    ("table", "column", "expected"),
    [
        ({"user_id": [1, None], "item_id": [1, 2], "timestamp": [1, 2]}, "user_id", "null"),
        ({"user_id": [1, 2], "item_id": [1, None], "timestamp": [1, 2]}, "item_id", "null"),
        ({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1, None]}, "timestamp", "null"),
        ({"user_id": [1, -2], "item_id": [1, 2], "timestamp": [1, 2]}, "user_id", "negative"),
        ({"user_id": [1, 2], "item_id": [-1, 2], "timestamp": [1, 2]}, "item_id", "negative"),
        ({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1.0, float("nan")]}, "timestamp", "non-finite"),
        ({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1.0, 1e30]}, "timestamp", "out-of-range"),
    ],
)
@pytest.mark.parametrize("statistics", [True, False])
def test_bad_values_name_file_and_column(tmp_path, table, column, expected, statistics):
    f = tmp_path / "bad_input.parquet"
    pq.write_table(pa.table(table), f, write_statistics=statistics)
    with pytest.raises(DataValidationError, match=expected) as err:
        run(f, tmp_path / "out")
    assert "bad_input.parquet" in str(err.value) and f"'{column}'" in str(err.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_null_found_by_scan_reports_row(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_rows(d / "a.parquet", ROWS)
    no_stats(
        d / "b.parquet", pa.table({"user_id": [1, 2, 3], "item_id": [1, 2, 3], "timestamp": [1, None, 3]})
    )
    with pytest.raises(
        DataValidationError, match=r"b\.parquet: column 'timestamp' has null timestamps .*row 1"
    ):
        run(d, tmp_path / "out")


def test_missing_column_and_wrong_type(tmp_path):
    f = tmp_path / "ratings.parquet"
    pq.write_table(pa.table({"user": [1], "item_id": [1], "timestamp": [1]}), f)
    with pytest.raises(
        DataValidationError, match=r"ratings\.parquet: missing user id column 'user_id'.*'user'"
    ):
        run(f, tmp_path / "out")
    run(f, tmp_path / "out", options=PrepareOptions(schema=InputSchema(user_col="user")))
    g = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"user_id": [1.0], "item_id": [1], "timestamp": [1]}), g)
    with pytest.raises(DataValidationError, match=r"floats\.parquet: column 'user_id' has type double"):
        run(g, tmp_path / "out2")


def test_ids_that_do_not_fit_int64(tmp_path):
    f = tmp_path / "huge.parquet"
    users = pa.array([1, 2**64 - 1], pa.uint64())
    pq.write_table(pa.table({"user_id": users, "item_id": [1, 2], "timestamp": [1, 2]}), f)
    with pytest.raises(DataValidationError, match=r"huge\.parquet: .*out of range"):
        run(f, tmp_path / "out")


def test_files_must_agree(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_rows(d / "a.parquet", ROWS)
    write_rows(d / "b.parquet", [(1, "x", 1)], item_type=pa.string())
    with pytest.raises(DataValidationError, match=r"b\.parquet: columns or types differ"):
        run(d, tmp_path / "out")


def test_empty_input(tmp_path):
    f = write_rows(tmp_path / "empty.parquet", [])
    with pytest.raises(DataValidationError, match=r"empty\.parquet: file has no rows"):
        run(f, tmp_path / "out")
    d = tmp_path / "d"
    d.mkdir()
    write_rows(d / "a.parquet", [])
    write_rows(d / "b.parquet", [])
    with pytest.raises(DataValidationError, match=r"a\.parquet, .*b\.parquet: input has no rows"):
        run(d, tmp_path / "out")


def test_per_user_list_length_mismatch(tmp_path):
    f = tmp_path / "lists.parquet"
    pq.write_table(
        pa.table({"user_id": ["a", "b"], "object_id": [[1, 2], [3, 4]], "event_time": [[1, 2], [3]]}), f
    )
    with pytest.raises(DataValidationError) as err:
        run(f, tmp_path / "out")
    msg = str(err.value)
    assert (
        "lists.parquet: row 1 (user 'b')" in msg
        and "'object_id' has 2" in msg
        and "'event_time' has 1" in msg
    )


def test_per_user_null_list_and_null_element(tmp_path):
    f = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"user_id": [1, 2], "object_id": [[1], None], "event_time": [[1], [2]]}), f)
    with pytest.raises(
        DataValidationError, match=r"lists\.parquet: column 'object_id' or 'event_time' is null at row 1"
    ):
        run(f, tmp_path / "out")
    g = tmp_path / "elems.parquet"
    pq.write_table(
        pa.table({"user_id": [1, 2], "object_id": [[1], [2, None]], "event_time": [[1], [2, 3]]}), g
    )
    with pytest.raises(
        DataValidationError, match=r"elems\.parquet: column 'object_id' \(list element\) has null"
    ):
        run(g, tmp_path / "out")

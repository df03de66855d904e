"""persrec recommend / export through the real entry point: outputs equal the Python API, mistakes exit 2."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import persrec
from persrec.cli import main
from tests.conftest import torchrun_command
from tests.serve.model_dirs import ITEM_IDS


def _interactions(path) -> dict[str, list[str]]:
    """Users u0..u5 in interaction layout (shuffled rows with timestamps); returns their ordered histories."""
    rng = np.random.default_rng(0)
    rows, histories = [], {}
    for user in range(6):
        items = [ITEM_IDS[i] for i in rng.integers(0, 30, size=4 + 3 * user)]
        histories[f"u{user}"] = items
        rows += [(f"u{user}", item, 100 * t) for t, item in enumerate(items)]
    order = rng.permutation(len(rows))
    users, items, times = zip(*[rows[i] for i in order], strict=True)
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": times}), path)
    return histories


def test_recommend_one_history_prints_json(model_dirs, capsys):
    rec = persrec.load_recommender(model_dirs["SASRec"])
    assert main(["recommend", str(model_dirs["SASRec"]), "--history", "m1000,m1007,unknown", "--k", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["items"] == rec.recommend(["m1000", "m1007"], k=4).items
    assert printed["unknown_items"] == {"count": 1, "examples": ["unknown"]}


@pytest.mark.parametrize("layout", ["interactions", "lists"])
def test_recommend_a_file_equals_the_python_api(model_dirs, tmp_path, layout):
    histories = _interactions(tmp_path / "in.parquet")
    if layout == "lists":
        pq.write_table(
            pa.table({"uid": list(histories), "seq": list(histories.values())}), tmp_path / "in.parquet"
        )
    flags = ["--user_col", "uid", "--item_col", "seq"] if layout == "lists" else []
    model = model_dirs["PersonalizedSASRec"]
    argv = [
        "recommend",
        str(model),
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out.parquet"),
    ]
    assert main([*argv, "--k", "5", "--batch_size", "4", "--refresh_every", "2", *flags]) == 0
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    rec = persrec.load_recommender(model, refresh_every=2)
    assert [row["user_id"] for row in table] == list(histories)
    for row in table:
        expected = rec.recommend(histories[row["user_id"]], k=5, user=row["user_id"])
        assert row["item_ids"] == expected.items
        assert row["scores"] == pytest.approx(expected.scores, abs=1e-6)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_export_writes_embeddings_and_a_faiss_index(model_dirs, tmp_path, capsys):
    histories = _interactions(tmp_path / "users.parquet")
    model = model_dirs["HSTU"]
    out = tmp_path / "export"
    assert (
        main(
            [
                "export",
                str(model),
                "--output",
                str(out),
                "--users",
                str(tmp_path / "users.parquet"),
                "--index",
                "faiss",
            ]
        )
        == 0
    )
    assert "recall@10 against the exact top-10 = " in capsys.readouterr().out
    rec = persrec.load_recommender(model)
    items = pq.read_table(out / "items.parquet")
    assert items.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    ids, vectors = rec.item_embeddings()
    assert items.column("item_id").to_pylist() == ids
    np.testing.assert_array_equal(np.stack(items.column("embedding").to_numpy(zero_copy_only=False)), vectors)
    users = pq.read_table(out / "users.parquet").to_pylist()
    for row in users:
        history = histories[row["user_id"]]
        np.testing.assert_allclose(
            row["embedding"], rec.user_embedding(history, [100 * t for t in range(len(history))]), atol=1e-6
        )
    meta = json.loads((out / "items.faiss.json").read_text())
    assert (
        meta["fingerprint"] == rec.fingerprint and 0.9 <= meta["recall_at_k"] <= 1.0
    )  # 30 items: HNSW is exact
    argv = ["recommend", str(model), "--input", str(tmp_path / "users.parquet"), "--k", "5", "--no_progress"]
    assert main([*argv, "--output", str(tmp_path / "exact.parquet")]) == 0
    assert (
        main([*argv, "--output", str(tmp_path / "ann.parquet"), "--retrieval", "faiss", "--index", str(out)])
        == 0
    )
    exact = pq.read_table(tmp_path / "exact.parquet").column("item_ids").to_pylist()
    assert pq.read_table(tmp_path / "ann.parquet").column("item_ids").to_pylist() == exact
    assert main(["export", str(model), "--output", str(out)]) == 2  # never replaced without --overwrite
    assert (
        main(
            [
                "recommend",
                str(model_dirs["SASRec"]),
                "--history",
                "m1000",
                "--retrieval",
                "faiss",
                "--index",
                str(out),
            ]
        )
        == 2
    )


MISTAKES = [
    (["recommend", "{model}"], "give either --history"),
    (["recommend", "{model}", "--history", "m1000", "--k", "99"], "--k: expected an integer in [1, 30]"),
    (["recommend", "{model}", "--input", "{tmp}/none.parquet", "--output", "{tmp}/o.parquet"], "--input"),
    (["recommend", "{model}", "--input", "{tmp}/in.parquet"], "--output: required with --input"),
    (["recommend", "{model}", "--history", "m1000", "--retrieval", "faiss"], "--index: required"),
    (["recommend", "{tmp}/nothing", "--history", "m1000"], "does not exist"),
    (
        ["recommend", "{model}", "--history", "m1000", "--refresh_every", "0"],
        "refresh_every must be a positive",
    ),
    (["serve", "{model}", "--api_key_file", "{tmp}/no-key"], "--api_key_file"),
    (["serve", "{model}", "--store", "{tmp}"], "--store"),
    (["export", "{model}"], "--output"),
    (["serve", "{model}", "--host", "203.0.113.9"], "cannot listen there"),
]


@pytest.mark.parametrize(("argv", "expect"), MISTAKES)
def test_mistakes_exit_2_with_one_line(model_dirs, tmp_path, capsys, argv, expect):
    _interactions(tmp_path / "in.parquet")
    model = model_dirs["PersonalizedSASRec"]
    assert main([a.format(model=model, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("persrec: ") and expect in err[0], err


@pytest.mark.slow
def test_recommend_under_torchrun_shards_users(model_dirs, tmp_path):
    histories = _interactions(tmp_path / "in.parquet")
    model = model_dirs["PersonalizedSASRec"]
    args = [
        "recommend",
        str(model),
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out.parquet"),
    ]
    subprocess.run(
        [*torchrun_command(2), "-m", "persrec.cli", *args, "--no_progress"], check=True, timeout=180
    )
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    rec = persrec.load_recommender(model)
    assert [row["user_id"] for row in table] == list(histories)
    for row in table:
        assert row["item_ids"] == rec.recommend(histories[row["user_id"]], user=row["user_id"]).items
    assert not list(tmp_path.glob(".out.parquet.part-*"))

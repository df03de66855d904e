"""The item-embedding benchmark's core on a tiny model: both batchings agree, padding is counted, rows complete.

No timing thresholds: times on a shared machine say nothing about correctness.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from benchmarks import item_embedding_throughput as bench  # noqa: E402
from tests.hf.tiny_models import tiny_llama_dir  # noqa: E402


def test_titles_are_read_and_sampled(tmp_path: Path) -> None:
    path = tmp_path / "items.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write('item_id,title\n1,red toy car\n2,\n3,doll\n4,"board game, wooden"\n')
    titles = bench.read_titles(path, 10)
    assert sorted(titles) == ["board game, wooden", "doll", "red toy car"]
    assert bench.read_titles(path, 2) == titles[:2]
    texts = bench.item_texts(["doll"], prompt="P ")
    assert texts.texts == ("", "P title: doll")


def test_measure_row(tmp_path: Path) -> None:
    titles = ["red toy car", "doll", "large set of three small green toy kids", "board game", "blue"] * 3
    row = bench.measure("tiny", tiny_llama_dir(tmp_path / "m"), bench.item_texts(titles, ""), 1, 1, 4, 64, 1)
    assert row["items"] == 15 and row["max_abs_diff"] <= 1e-5
    assert row["sorted"]["padding_fraction"] < row["padded"]["padding_fraction"]
    assert row["sorted"]["real_tokens"] == row["padded"]["real_tokens"]
    assert row["speedup"] == pytest.approx(row["sorted"]["items_per_s"] / row["padded"]["items_per_s"])
    assert bench.table([row]).count("\n") == 2


def test_catalogue_padding_counts_slots(tmp_path: Path) -> None:
    titles = ["doll", "red toy car", "large set of three small green toy kids", "blue"]
    row = bench.catalogue_padding("tiny", tiny_llama_dir(tmp_path / "m"), titles, 1, 2, 64)
    # [BOS], the prompt's 6 words and its ":", "title", ":", the title's words, then the item token
    lengths = [1 + 7 + 2 + words + 1 for words in (1, 3, 8, 1)]
    assert row["padded_token_slots"] == 2 * max(lengths[:2]) + 2 * max(lengths[2:])
    assert row["sorted_token_slots"] == 2 * lengths[0] + 2 * lengths[2]
    assert row["sorted_padding_fraction"] == pytest.approx(1 - sum(lengths) / row["sorted_token_slots"])

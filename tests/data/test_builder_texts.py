"""The builders' item tables are what `--text_keys` selects from: the HLLM item text read back from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from persrec.cli import main
from persrec.hf.item_text import ItemTextOptions, load_item_texts
from tests.data.builder_files import write_amazon_2014, write_ebnerd


def _prepare(fmt: str, raw: Path, out: Path) -> Path:
    assert main(["prepare", "--format", fmt, "--input", str(raw), "--output", str(out)]) == 0
    return out


def test_amazon_text_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSREC_CACHE_DIR", str(tmp_path / "cache"))
    out = _prepare("amazon-reviews", write_amazon_2014(tmp_path / "raw"), tmp_path / "p")
    options = ItemTextOptions(text_keys=("title", "description", "categories", "brand"), prompt="")
    assert load_item_texts(out, options).texts[1:] == (
        'title: Tool Box & Easel description: Learn "fast" categories: Toys & Games, Arts',
        "categories: Toys & Games brand: Melissa & Doug",
        'title: It\'s "quoted"',
    )


def test_ebnerd_text_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSREC_CACHE_DIR", str(tmp_path / "cache"))
    out = _prepare("ebnerd", write_ebnerd(tmp_path / "raw"), tmp_path / "p")
    options = ItemTextOptions(text_keys=("title", "subtitle", "topics"), prompt="")
    assert load_item_texts(out, options).texts[1:] == (
        "title: Første nyhed subtitle: sub topics: Sport, Fodbold",
        "title: Second",
        "title: Third",
    )

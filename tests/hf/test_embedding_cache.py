"""The on-disk item-embedding cache: hit, miss, every key part, and bad files rebuilt rather than trusted."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from persrec.hf import embedding_cache
from persrec.hf.embedding_cache import cache_file, cached_item_embeddings, embedding_cache_key
from persrec.hf.item_encoder import ItemEncoderOptions, ItemTextEncoder
from tests.hf.test_item_encoder import TEXTS
from tests.hf.tiny_models import tiny_bert_dir, tiny_llama_dir


def _frozen(model_dir: Path, texts=TEXTS, **options: object) -> ItemTextEncoder:
    torch.manual_seed(0)
    encoder = ItemTextEncoder(model_dir, texts, ItemEncoderOptions(**{"item_emb_token_n": 0, **options}))
    encoder.llm.requires_grad_(False)
    return encoder


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    """A tiny BERT with saved weights, so every load gives the same model."""
    path = tiny_bert_dir(tmp_path / "bert")
    torch.manual_seed(1)
    ItemTextEncoder(path, TEXTS).llm.save_pretrained(str(path))
    return path


def test_miss_then_hit(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = _frozen(model_dir)
    first = cached_item_embeddings(encoder, tmp_path / "cache")
    assert not first.hit and first.reason == "no cached file" and first.path.is_file()
    calls = []
    monkeypatch.setattr(ItemTextEncoder, "embed_all", lambda self, batch_size=None: calls.append(1))
    second = cached_item_embeddings(_frozen(model_dir), tmp_path / "cache")
    assert second.hit and not calls and second.path == first.path
    assert torch.equal(second.embeddings, first.embeddings)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]  # no temp file left


def _key_path(encoder: ItemTextEncoder, cache: Path) -> Path:
    return cache_file(cache, embedding_cache_key(encoder))


def test_every_key_part_changes_the_file(model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    base = _key_path(_frozen(model_dir), cache)
    variants = {
        "prompt": _key_path(_frozen(model_dir, replace(TEXTS, prompt="other ")), cache),
        "text": _key_path(
            _frozen(model_dir, replace(TEXTS, texts=(*TEXTS.texts[:-1], "title: doll doll"))), cache
        ),
        "max length": _key_path(_frozen(model_dir, max_text_length=4), cache),
        "item tokens": _key_path(_frozen(model_dir, item_emb_token_n=1), cache),
        "dtype": _key_path(
            ItemTextEncoder(model_dir, TEXTS, ItemEncoderOptions(item_emb_token_n=0), dtype=torch.bfloat16),
            cache,
        ),
    }
    assert len({base, *variants.values()}) == 1 + len(variants), variants
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    assert _key_path(_frozen(model_dir), cache) != base


def test_item_token_values_are_part_of_the_key(model_dir: Path) -> None:
    encoder = _frozen(model_dir, item_emb_token_n=1)
    before = embedding_cache_key(encoder)
    with torch.no_grad():
        encoder.item_tokens.add_(1.0)
    assert embedding_cache_key(encoder)["item_tokens_sha256"] != before["item_tokens_sha256"]


def test_large_weights_identified_by_size_and_mtime(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding_cache, "CONTENT_HASH_LIMIT", 1000)
    weights = model_dir / "model.safetensors"
    entry = next(e for e in embedding_cache.model_files_identity(model_dir) if e["name"] == weights.name)
    assert "sha256" not in entry and entry["size"] == weights.stat().st_size
    os.utime(weights, ns=(entry["mtime_ns"] + 10**9, entry["mtime_ns"] + 10**9))
    again = next(e for e in embedding_cache.model_files_identity(model_dir) if e["name"] == weights.name)
    assert again["mtime_ns"] != entry["mtime_ns"]


def _rebuilt(model_dir: Path, cache: Path, spoil) -> tuple[str, torch.Tensor, torch.Tensor]:
    good = cached_item_embeddings(_frozen(model_dir), cache)
    spoil(good.path, good)
    again = cached_item_embeddings(_frozen(model_dir), cache)
    assert not again.hit
    reread = cached_item_embeddings(_frozen(model_dir), cache)  # the rebuilt file is good again
    assert reread.hit
    return again.reason, again.embeddings, good.embeddings


def test_truncated_file_is_rebuilt(model_dir: Path, tmp_path: Path) -> None:
    def truncate(path: Path, _good) -> None:
        path.write_bytes(path.read_bytes()[:40])

    reason, rebuilt, good = _rebuilt(model_dir, tmp_path / "cache", truncate)
    assert "unreadable" in reason and torch.equal(rebuilt, good)


def test_foreign_key_wrong_shape_and_bad_values_are_rebuilt(model_dir: Path, tmp_path: Path) -> None:
    def other_key(path: Path, good) -> None:
        save_file({"item_embeddings": good.embeddings}, str(path), metadata={"format": "x", "key": "{}"})

    def wrong_shape(path: Path, good) -> None:
        key = embedding_cache._key_text(embedding_cache_key(_frozen(model_dir)))
        meta = {"format": embedding_cache.CACHE_FORMAT, "key": key}
        save_file({"item_embeddings": good.embeddings[:-1].contiguous()}, str(path), metadata=meta)

    def nan_values(path: Path, good) -> None:
        key = embedding_cache._key_text(embedding_cache_key(_frozen(model_dir)))
        meta = {"format": embedding_cache.CACHE_FORMAT, "key": key}
        spoiled = good.embeddings.clone()
        spoiled[2, 0] = float("nan")
        save_file({"item_embeddings": spoiled}, str(path), metadata=meta)

    expected = {other_key: "key differs", wrong_shape: "holds (5, 16)", nan_values: "non-finite"}
    for index, (spoil, words) in enumerate(expected.items()):
        reason, rebuilt, good = _rebuilt(model_dir, tmp_path / f"cache{index}", spoil)
        assert words in reason and torch.equal(rebuilt, good)


def test_trainable_item_llm_is_refused(tmp_path: Path) -> None:
    encoder = ItemTextEncoder(tiny_llama_dir(tmp_path / "llama"), TEXTS)
    with pytest.raises(ValueError, match="need a frozen item LLM"):
        cached_item_embeddings(encoder, tmp_path / "cache")

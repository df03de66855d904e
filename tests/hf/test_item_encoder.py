"""The item LLM: padded, length-sorted batches equal one-by-one runs; item tokens learn; pooling skips padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from persrec.config import ConfigError
from persrec.hf import item_encoder
from persrec.hf.item_encoder import ItemEncoderOptions, ItemTextEncoder, padded_slots, plan_batches
from persrec.hf.item_text import ItemTexts
from tests.hf.tiny_models import tiny_bert_dir, tiny_gpt2_dir, tiny_llama_dir

TEXTS = ItemTexts(
    texts=(
        "",
        "title: red toy car",
        "title: blue wooden puzzle game , board",
        "title: doll",
        "title: large set of three small green toy kids",
        "title: comedy game",
    ),
    prompt="",
    keys=("title",),
    source=Path("test"),
)
BUILDERS = {"llama": tiny_llama_dir, "bert": tiny_bert_dir, "gpt2": tiny_gpt2_dir}


def _encoder(tmp_path: Path, kind: str, tokens: int, **options: object) -> ItemTextEncoder:
    torch.manual_seed(0)
    model_dir = BUILDERS[kind](tmp_path / kind)
    return ItemTextEncoder(model_dir, TEXTS, ItemEncoderOptions(item_emb_token_n=tokens, **options))


def _alone(encoder: ItemTextEncoder, item: int) -> torch.Tensor:
    """The item's embedding by hand: its tokens then the item tokens, no padding, no mask."""
    start, length = int(encoder.token_starts[item - 1]), int(encoder.text_lengths[item - 1])
    ids = encoder.token_ids[start : start + length][None]
    embeds = encoder.llm.get_input_embeddings()(ids)
    count = encoder.options.item_emb_token_n
    if count:
        embeds = torch.cat([embeds, encoder.item_tokens[None]], dim=1)
    hidden = encoder.llm(inputs_embeds=embeds).last_hidden_state[0]
    return hidden[-count:].mean(0) if count else hidden.mean(0)


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("tokens", [0, 1, 2])
def test_padded_batches_equal_one_by_one(tmp_path: Path, kind: str, tokens: int) -> None:
    encoder = _encoder(tmp_path, kind, tokens, batch_size=3)
    encoder.eval()
    batched = encoder.embed_all()
    assert batched.shape == (6, 16) and torch.equal(batched[0], torch.zeros(16))
    assert encoder.last_stats.padding_fraction > 0  # the test really pads
    with torch.no_grad():
        by_hand = torch.stack([torch.zeros(16)] + [_alone(encoder, item) for item in range(1, 6)])
    assert (batched - by_hand).abs().max() <= 1e-5
    naive = ItemTextEncoder(
        encoder.model_dir, TEXTS, ItemEncoderOptions(item_emb_token_n=tokens, length_sorted=False)
    )
    naive.load_state_dict(encoder.state_dict())
    assert (naive.embed_all(batch_size=4) - batched).abs().max() <= 1e-5


def test_embed_any_shape_with_padding_and_repeats(tmp_path: Path) -> None:
    encoder = _encoder(tmp_path, "llama", 1, batch_size=2)
    encoder.eval()
    table = encoder.embed_all()
    picked = encoder.embed(torch.tensor([[3, 0, 1], [3, 5, 0]]))
    assert picked.shape == (2, 3, 16)
    assert (picked - table[torch.tensor([[3, 0, 1], [3, 5, 0]])]).abs().max() <= 1e-5
    assert encoder.last_stats.items == 3  # items 1, 3, 5 once each; 0 costs nothing
    with pytest.raises(IndexError, match="0..5"):
        encoder.embed(torch.tensor([6]))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_gradients_reach_item_tokens_and_the_llm(tmp_path: Path, kind: str) -> None:
    encoder = _encoder(tmp_path, kind, 2)
    encoder.train()
    encoder.embed(torch.tensor([1, 2, 4])).pow(2).sum().backward()
    assert encoder.item_tokens.grad is not None and encoder.item_tokens.grad.abs().min() > 0
    assert encoder.llm.get_input_embeddings().weight.grad.abs().sum() > 0


def test_mean_pooling_ignores_padding(tmp_path: Path) -> None:
    """Padding ids are given a huge embedding: any leak into the mean would show."""
    encoder = _encoder(tmp_path, "bert", 0, batch_size=5, length_sorted=False)
    encoder.eval()
    with torch.no_grad():
        clean = encoder.embed_all()
        encoder.llm.get_input_embeddings().weight[encoder.pad_token_id] = 1e4
        poisoned = encoder.embed_all()
    assert encoder.last_stats.padding_fraction > 0.3
    assert (clean - poisoned).abs().max() <= 1e-5


def test_truncation_to_max_text_length(tmp_path: Path) -> None:
    encoder = _encoder(tmp_path, "llama", 1, max_text_length=4)
    full = _encoder(tmp_path, "llama", 1)
    assert full.text_lengths.tolist() == [6, 9, 4, 11, 5]  # [BOS] + words (":" and "," are tokens)
    assert encoder.text_lengths.tolist() == [4, 4, 4, 4, 4]


def test_batch_plans_and_padding_count() -> None:
    lengths = np.array([7, 10, 4, 12, 5])
    assert [b.tolist() for b in plan_batches(lengths, 2, True)] == [[2, 4], [0, 1], [3]]
    assert [b.tolist() for b in plan_batches(lengths, 2, False)] == [[0, 1], [2, 3], [4]]
    assert padded_slots(lengths, plan_batches(lengths, 2, True)) == 2 * 5 + 2 * 10 + 12
    assert padded_slots(lengths, plan_batches(lengths, 2, False)) == 2 * 10 + 2 * 12 + 5


def test_padding_fraction_is_counted(tmp_path: Path) -> None:
    encoder = _encoder(tmp_path, "llama", 1, batch_size=2)
    encoder.embed_all()
    lengths = encoder.text_lengths + 1
    stats = encoder.last_stats
    assert stats.real_tokens == lengths.sum() and stats.batches == 3 and stats.items == 5
    assert stats.slots == padded_slots(lengths, plan_batches(lengths, 2, True))
    assert stats.padding_fraction == pytest.approx(1 - lengths.sum() / stats.slots)


@pytest.mark.parametrize(
    ("options", "flag"),
    [({"max_text_length": 0, "tokens": 1}, "--MAX_TEXT_LENGTH"), ({"tokens": -1}, "--item_emb_token_n")],
)
def test_bad_options(tmp_path: Path, options: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        _encoder(tmp_path, "llama", **options)


def test_hub_id_refused() -> None:
    with pytest.raises(ConfigError, match="--item_pretrain_dir HuggingFaceTB/SmolLM2: looks like a hub id"):
        ItemTextEncoder("HuggingFaceTB/SmolLM2", TEXTS)


def test_tokenizing_in_chunks_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _encoder(tmp_path, "llama", 1)
    monkeypatch.setattr(item_encoder, "TOKENIZE_CHUNK", 2)
    chunked = _encoder(tmp_path, "llama", 1)
    assert torch.equal(whole.token_ids, chunked.token_ids) and torch.equal(
        whole.token_starts, chunked.token_starts
    )
    assert whole.text_lengths.tolist() == chunked.text_lengths.tolist()

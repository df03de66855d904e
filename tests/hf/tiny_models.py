"""Tiny Hugging Face model directories built from configs (random weights) with a word-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")

WORDS = (
    "compress the following sentence into embedding title genres red blue green toy car doll puzzle game "
    "board wooden large small kids set of two three action drama comedy"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[BOS]"]


def save_tokenizer(path: Path, bos: bool) -> None:
    """A whitespace word-level tokenizer (punctuation split off), saved so AutoTokenizer loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS + [":", ","])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
        )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]"
    )
    fast.save_pretrained(str(path))


def vocab_size() -> int:
    return len(SPECIALS) + len(WORDS) + 2


def tiny_llama_dir(path: Path) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_tokenizer(path, bos=True)
    return path


def tiny_bert_dir(path: Path) -> Path:
    config = transformers.BertConfig(
        vocab_size=vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_tokenizer(path, bos=False)
    return path


def tiny_gpt2_dir(path: Path) -> Path:
    config = transformers.GPT2Config(
        vocab_size=vocab_size(),
        n_embd=16,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=2,
        eos_token_id=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_tokenizer(path, bos=False)
    return path

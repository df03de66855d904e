"""Build the Hugging Face backbones (LLaMAID, HLLM) from a `Config`: model directories, widths, attention."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from persrec.config import Config, ConfigError
from persrec.data.datasets.registry import default_cache_dir
from persrec.hf.embedding_cache import cached_item_embeddings
from persrec.hf.item_encoder import ItemEncoderOptions, ItemTextEncoder
from persrec.hf.item_text import ItemTextOptions, load_item_texts
from persrec.hf.loading import load_base_model, resolve_model_dir
from persrec.hf.tiny import build_decoder, decoder_config, decoder_config_from_json
from persrec.models.base import BackboneConfig
from persrec.models.hf_decoder import USER_MODEL_CONFIG, HFDecoderBackbone
from persrec.models.hllm import ITEM_MODEL_CONFIG, HLLMBackbone
from persrec.models.registry import canonical_model_name


def hf_attention(config: Config) -> str:
    """transformers' attention implementation for a config (`auto` = sdpa, which takes boolean masks)."""
    return "sdpa" if config.attention_implementation == "auto" else config.attention_implementation


def build_user_decoder(config: Config, max_positions: int, model_dir: Path | None = None):
    """The user model: the architecture saved in `model_dir` (random weights, to be loaded), else from
    `user_pretrain_dir`, else a Llama sized by the persrec keys."""
    attention = hf_attention(config)
    saved = None if model_dir is None else model_dir / USER_MODEL_CONFIG
    if saved is not None and saved.is_file():
        return build_decoder(decoder_config_from_json(saved), attention)
    if config.user_pretrain_dir:
        path = resolve_model_dir(config.user_pretrain_dir, "user_pretrain_dir")
        return load_base_model(path, option="user_pretrain_dir", attn_implementation=attention)
    heads = config.n_heads
    if config.item_embedding_size % heads or (config.item_embedding_size // heads) % 2:
        raise ConfigError(
            f"--item_embedding_size {config.item_embedding_size} / --n_heads {heads}: the built-in Llama needs "
            "a width divisible by n_heads into an even head width (rotary positions), e.g. 64 with 4 heads"
        )
    llama = decoder_config(
        "llama",
        hidden_size=config.item_embedding_size,
        num_layers=config.n_layers,
        num_heads=heads,
        intermediate_size=config.inner_size or 4 * config.item_embedding_size,
        max_positions=max(max_positions, 16),
        dropout=config.attn_dropout_prob,
    )
    return build_decoder(llama, attention)


def build_hf_backbone(
    config: Config,
    backbone: BackboneConfig,
    model_dir: Path | None = None,
    dataset_dir: Path | None = None,
) -> HFDecoderBackbone:
    """LLaMAID: an item-ID table (projected when its width differs from the decoder's) into the decoder.
    HLLM: item vectors from the item LLM over the item texts of `dataset_dir` (or `text_path`)."""
    name = canonical_model_name(config.model)
    decoder = build_user_decoder(config, backbone.max_positions, model_dir)
    try:
        if name == "LLaMAID":
            return HFDecoderBackbone(backbone, decoder)
        return build_hllm(config, backbone, decoder, model_dir, dataset_dir)
    except ValueError as error:
        raise ConfigError(f"--model {config.model}: {error}") from error


def item_embedding_cache_dir(config: Config) -> Path:
    root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    return root / "item_embeddings"


def build_hllm(
    config: Config,
    backbone: BackboneConfig,
    decoder: Any,
    model_dir: Path | None,
    dataset_dir: Path | None,
) -> HLLMBackbone:
    """The item side of HLLM: a frozen table (computed once, or read back from saved weights) or the
    trainable item LLM itself."""
    saved = None if model_dir is None else model_dir / ITEM_MODEL_CONFIG
    if not config.item_llm_trainable and saved is not None and saved.is_file():
        # Saved weights hold the item table: the item LLM is not needed to rebuild the model.
        text = saved.read_text()
        width = int(json.loads(text)["hidden_size"])
        table = torch.zeros(backbone.num_items + 1, width)
        shape = replace(backbone, embedding_dim=width)
        return HLLMBackbone(shape, decoder, item_table=table, item_model_config=text)
    if dataset_dir is None and not config.text_path:
        raise ConfigError(
            f"--model {config.model} needs the dataset's item table or --text_path for item texts"
        )
    texts = load_item_texts(
        dataset_dir if dataset_dir is not None else Path("."),
        ItemTextOptions(
            text_keys=tuple(config.text_keys),
            prompt=config.item_prompt,
            text_path=Path(config.text_path) if config.text_path else None,
        ),
    )
    if texts.num_items != backbone.num_items:
        raise ConfigError(
            f"item texts cover {texts.num_items} items but the dataset has {backbone.num_items}; "
            "--text_path must hold one row per item of the dataset"
        )
    encoder = ItemTextEncoder(
        config.item_pretrain_dir,
        texts,
        ItemEncoderOptions(
            max_text_length=config.MAX_TEXT_LENGTH,
            item_emb_token_n=config.item_emb_token_n,
            attn_implementation=hf_attention(config),
        ),
    )
    item_config = encoder.llm.config.to_json_string()
    shape = replace(backbone, embedding_dim=encoder.hidden_size)
    if config.item_llm_trainable:
        return HLLMBackbone(shape, decoder, item_encoder=encoder, item_model_config=item_config)
    encoder.requires_grad_(False)
    if config.item_emb_token_n:
        print(
            f"persrec: note: --item_emb_token_n {config.item_emb_token_n} with a frozen item model embeds every "
            "item through untrained item tokens; --item_emb_token_n 0 (mean pooling) is what frozen encoders "
            "are trained for",
            file=sys.stderr,
        )
    cached = cached_item_embeddings(encoder, item_embedding_cache_dir(config))
    state = "read from" if cached.hit else "computed and saved to"
    print(f"item embeddings of {texts.num_items} items {state} {cached.path}", flush=True)
    return HLLMBackbone(shape, decoder, item_table=cached.embeddings, item_model_config=item_config)

"""Build the Hugging Face backbones (LLaMAID, HLLM) from a `Config`: model directories, widths, attention."""

from __future__ import annotations

from pathlib import Path

from persrec.config import Config, ConfigError
from persrec.hf.loading import load_base_model, resolve_model_dir
from persrec.hf.tiny import build_decoder, decoder_config, decoder_config_from_json
from persrec.models.base import BackboneConfig
from persrec.models.hf_decoder import USER_MODEL_CONFIG, HFDecoderBackbone
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
    config: Config, backbone: BackboneConfig, model_dir: Path | None = None
) -> HFDecoderBackbone:
    """LLaMAID: an item-ID table (projected when its width differs from the decoder's) into the decoder."""
    name = canonical_model_name(config.model)
    decoder = build_user_decoder(config, backbone.max_positions, model_dir)
    try:
        if name == "LLaMAID":
            return HFDecoderBackbone(backbone, decoder)
    except ValueError as error:
        raise ConfigError(f"--model {config.model}: {error}") from error
    raise ConfigError(f"--model {config.model}: not a Hugging Face backbone")

"""Translate the user-facing `Config` (original script names) into the library's clearly named configs."""

from __future__ import annotations

from pathlib import Path

from persrec.config import Config, ConfigError
from persrec.data.datasets.registry import resolve_dataset
from persrec.data.datasets.synthetic import SyntheticConfig
from persrec.data.sequences import WindowConfig
from persrec.data.store import PreparedDataset
from persrec.models import BackboneConfig, build_backbone, canonical_model_name
from persrec.models.recommender import SequentialRecommender
from persrec.train.loss import NCEConfig


def window_config(config: Config) -> WindowConfig:
    try:
        return WindowConfig(
            max_length=config.MAX_ITEM_LIST_LENGTH,
            feature_max_length=config.train_feat_max_length,
            start_position=config.item_start_position,
            end_position=config.item_end_position,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error


def backbone_config(config: Config, num_items: int) -> BackboneConfig:
    return BackboneConfig(
        num_items=num_items,
        max_positions=config.MAX_ITEM_LIST_LENGTH,
        embedding_dim=config.item_embedding_size,
        num_layers=config.n_layers,
        num_heads=config.n_heads,
        dropout=config.hidden_dropout_prob,
        attn_dropout=config.attn_dropout_prob,
        qk_dim=config.hstu_qk_dim,
        v_dim=config.hstu_v_dim,
        relative_position_bias=config.relative_position_bias,
        relative_time_bias=config.relative_time_bias,
        ffn_dim=config.inner_size,
        attention_implementation=config.attention_implementation,
    )


def nce_config(config: Config) -> NCEConfig:
    if config.loss != "nce":
        raise ConfigError(f"loss={config.loss!r} is not supported; the only loss is 'nce' (sampled softmax)")
    return NCEConfig(
        num_negatives=config.num_negatives,
        in_batch_negatives=config.in_batch_negatives,
        gather_across_ranks=config.gather_negatives,
        temperature=config.temperature,
        learnable_temperature=not config.fix_temp,
        collision_cosine_threshold=config.collision_cosine_threshold,
    )


def build_model(config: Config, num_items: int) -> SequentialRecommender:
    try:
        name = canonical_model_name(config.model)
        return SequentialRecommender(build_backbone(name, backbone_config(config, num_items)))
    except ValueError as error:
        raise ConfigError(str(error)) from error


def load_dataset(config: Config, progress: bool = True) -> PreparedDataset:
    return resolve_dataset(
        config.dataset,
        data_path=Path(config.data_path) if config.data_path else None,
        cache_dir=Path(config.cache_dir) if config.cache_dir else None,
        synthetic=SyntheticConfig(num_users=config.synthetic_users),
        progress=progress,
    )

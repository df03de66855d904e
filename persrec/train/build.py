"""Translate the user-facing `Config` (original script names) into the library's clearly named configs."""

from __future__ import annotations

from pathlib import Path

from persrec.config import Config, ConfigError
from persrec.data.datasets.registry import resolve_dataset
from persrec.data.datasets.synthetic import SyntheticConfig
from persrec.data.sequences import WindowConfig
from persrec.data.store import PreparedDataset
from persrec.models import BackboneConfig, build_backbone, canonical_model_name
from persrec.models.experts import ExpertLayout, ExpertSequenceModel
from persrec.models.recommender import ExpertOptions, ExpertRecommender, SequentialRecommender
from persrec.models.registry import is_hf_backbone
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


def expert_layout(config: Config) -> ExpertLayout | None:
    """The expert-token layout, or None for a plain backbone."""
    personalized = config.model.lower().startswith("personalized")
    if config.number_of_user_tokens <= 0:
        if personalized:
            raise ConfigError(f"model={config.model} needs number_of_user_tokens > 0")
        return None
    try:
        return ExpertLayout.from_options(
            window=config.MAX_ITEM_LIST_LENGTH,
            number_of_user_tokens=config.number_of_user_tokens,
            insert_method=config.insert_method,
            pretrain_item_num=config.pretrain_item_num,
            recent_item_num=config.recent_item_num,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error


def backbone_config(config: Config, num_items: int) -> BackboneConfig:
    layout = expert_layout(config)
    return BackboneConfig(
        num_items=num_items,
        max_positions=config.MAX_ITEM_LIST_LENGTH if layout is None else layout.length,
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
        item_init_std=config.initializer_range,
        attention_implementation=config.attention_implementation,
    )


def nce_config(config: Config) -> NCEConfig:
    if config.loss != "nce":
        raise ConfigError(f"loss={config.loss!r} is not supported; the only loss is 'nce' (sampled softmax)")
    return NCEConfig(
        num_negatives=config.num_negatives,
        negatives_per_sequence=config.negatives_per_sequence,
        negatives_per_position=config.negatives_per_position,
        in_batch_negatives=config.in_batch_negatives,
        gather_across_ranks=config.gather_negatives,
        temperature=config.temperature,
        learnable_temperature=not config.fix_temp,
        collision_cosine_threshold=config.collision_cosine_threshold,
    )


def build_model(
    config: Config,
    num_items: int,
    num_users: int = 0,
    model_dir: Path | None = None,
    dataset_dir: Path | None = None,
) -> SequentialRecommender | ExpertRecommender:
    """The recommender a config describes; `num_users` sizes the optional per-user expert table.

    `model_dir`: a directory of saved weights whose architecture files (a Hugging Face decoder's config) are
    used instead of the config's model directories, whose weights are about to be replaced anyway.
    `dataset_dir`: the prepared dataset, whose item table gives HLLM its item texts.
    """
    try:
        shape = backbone_config(config, num_items)
        if is_hf_backbone(config.model):
            from persrec.train.hf_build import build_hf_backbone

            backbone = build_hf_backbone(config, shape, model_dir, dataset_dir)
        else:
            backbone = build_backbone(canonical_model_name(config.model), shape)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from error
    layout = expert_layout(config)
    if layout is None:
        return SequentialRecommender(backbone)
    for name in ("item_dropout", "history_dropout"):
        if not 0 <= getattr(config, name) < 1:
            raise ConfigError(f"{name}={getattr(config, name)} must lie in [0, 1)")
    model = ExpertSequenceModel(backbone, layout, num_users if config.per_user_expert_tokens else 0)
    options = ExpertOptions(
        loss_on_all_items=config.loss_on_all_items,
        item_dropout=config.item_dropout,
        history_dropout=config.history_dropout,
        predict_with_full_item_seq=config.predict_with_full_item_seq,
        use_cache=config.eval_use_cache,
    )
    return ExpertRecommender(model, options)


def load_dataset(config: Config, progress: bool = True) -> PreparedDataset:
    return resolve_dataset(
        config.dataset,
        data_path=Path(config.data_path) if config.data_path else None,
        cache_dir=Path(config.cache_dir) if config.cache_dir else None,
        synthetic=SyntheticConfig(num_users=config.synthetic_users),
        progress=progress,
    )

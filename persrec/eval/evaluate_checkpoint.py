"""`persrec evaluate CHECKPOINT`: re-score saved weights on the validation and test splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persrec.config import ConfigError, apply_overrides, load_config
from persrec.data.fingerprint import dataset_fingerprint, require_same_dataset
from persrec.eval.ranking import EvalConfig, format_metrics_table
from persrec.eval.runner import eval_loader, evaluate_model
from persrec.models.recommender import ExpertRecommender
from persrec.train import checkpoint as ckpt
from persrec.train.build import build_model, load_dataset, window_config
from persrec.train.distributed import setup_distributed, teardown_distributed


def find_weights(path: Path) -> Path:
    """Accept a run directory (its best weights), a checkpoint directory or a weights file."""
    candidates = [path, path / "model.safetensors", path / "best" / "model.safetensors"]
    latest = ckpt.latest_checkpoint(path) if path.is_dir() else None
    if latest is not None:
        candidates.append(latest / "model.safetensors")
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix == ".safetensors":
            return candidate
    raise ConfigError(
        f"no model.safetensors found at {path} (looked for {', '.join(map(str, candidates[1:]))})"
    )


def evaluate_checkpoint(path: Path, overrides: dict[str, Any]) -> int:
    weights = find_weights(path)
    config_file = weights.parent / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{config_file} is missing: the checkpoint's config is needed to rebuild the model")
    config = apply_overrides(load_config([config_file]), overrides, where="the command line")
    ctx = setup_distributed(config.device)
    try:
        store = load_dataset(config, progress=ctx.is_main)
        require_same_dataset(
            ckpt.load_dataset_fingerprint(weights.parent),
            dataset_fingerprint(store),
            str(weights),
            allow=config.allow_dataset_mismatch,
        )
        model = build_model(
            config, store.num_items, store.num_users, model_dir=weights.parent, dataset_dir=store.path
        ).to(ctx.device)
        ckpt.load_weights(model, weights)
        window = window_config(config)
        eval_config = EvalConfig(ks=tuple(config.topk), filter_seen=config.filter_seen, ties="pessimistic")
        results = {}
        is_expert = isinstance(model, ExpertRecommender)
        if (config.compare_cache or config.stale_experts) and not is_expert:
            raise ConfigError(
                "compare_cache and stale_experts need an expert model (number_of_user_tokens > 0)"
            )
        for split in ["valid"] if config.val_only else ["valid", "test"]:
            loader = eval_loader(store, split, window, config.eval_batch_size, ctx, config.filter_seen)
            if config.compare_cache:
                results[f"{split} (expert cache)"] = evaluate_model(
                    model, loader, eval_config, ctx.device, use_cache=True
                )
                results[f"{split} (full masked pass)"] = evaluate_model(
                    model, loader, eval_config, ctx.device, use_cache=False
                )
            else:
                results[split] = evaluate_model(model, loader, eval_config, ctx.device)
            for gap in config.stale_experts:
                recent = config.MAX_ITEM_LIST_LENGTH - model.model.layout.history_length
                stale = eval_loader(
                    store,
                    split,
                    window,
                    config.eval_batch_size,
                    ctx,
                    config.filter_seen,
                    stale_gap=(recent, gap),
                )
                results[f"{split} (experts {gap} interactions stale)"] = evaluate_model(
                    model, stale, eval_config, ctx.device
                )
        if ctx.is_main:
            print(f"checkpoint: {weights}")
            print(format_metrics_table(results, filter_seen=config.filter_seen))
    finally:
        teardown_distributed()
    return 0

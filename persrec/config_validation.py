"""`Config.validate`: every value no run can use is named by its flag before anything is built or written."""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from persrec.config import (
    ATTENTION_IMPLEMENTATIONS,
    HF_ATTENTION_IMPLEMENTATIONS,
    LOGGERS,
    LOSSES,
    PRECISIONS,
    SCHEDULERS,
    STRATEGIES,
    ZERO_STAGES,
    Config,
    ConfigError,
    _fields,
    format_value,
)


def _fail(key: str, expected: str, value: Any) -> ConfigError:
    shown = repr(value) if isinstance(value, str) else format_value(value)
    return ConfigError(f"--{key}: expected {expected}, got {shown}")


def _at_least(config: Any, prefix: str, names: tuple[str, ...], low: int) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            raise _fail(prefix + name, f"an integer >= {low}", value)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--{key}: expected one of {', '.join(choices)}, got {value!r}{hint}")


def measured_metrics(topk: list[int]) -> list[str]:
    """Metric names an evaluation with cutoffs `topk` reports, taken from the evaluator itself."""
    from persrec.eval.metrics import RankingAccumulator

    return [name for name in RankingAccumulator(topk).compute() if name != "count"]


def _check_numbers(config: Config) -> None:
    _at_least(
        config,
        "",
        (
            "train_batch_size",
            "eval_batch_size",
            "eval_interval",
            "item_embedding_size",
            "n_layers",
            "n_heads",
        ),
        1,
    )
    _at_least(config, "", ("MAX_ITEM_LIST_LENGTH", "synthetic_users", "train_feat_max_length"), 1)
    _at_least(
        config,
        "",
        ("num_negatives", "inner_size", "hstu_qk_dim", "hstu_v_dim", "epochs", "max_steps", "num_workers"),
        0,
    )
    _at_least(config, "", ("number_of_user_tokens", "stopping_step", "save_every_steps"), 0)
    _at_least(config, "", ("item_start_position", "item_end_position"), 0)
    _at_least(config, "", ("pretrain_item_num", "recent_item_num"), 0)
    _at_least(config.optim_args, "optim_args.", ("warmup_steps",), 0)
    for section, prefix in ((config, ""), (config.optim_args, "optim_args.")):
        for name, annotation in _fields(type(section)).items():
            value = getattr(section, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise _fail(prefix + name, "a finite number", value)
            if name.endswith(("dropout", "dropout_prob")) and annotation is float and not 0 <= value < 1:
                raise _fail(prefix + name, "a probability in [0, 1)", value)
    if not config.temperature > 0:
        raise _fail("temperature", "a number > 0", config.temperature)
    if not config.initializer_range > 0:
        raise _fail("initializer_range", "a number > 0", config.initializer_range)
    threshold = config.collision_cosine_threshold
    if threshold is not None and not -1 <= threshold <= 1:
        raise _fail("collision_cosine_threshold", "a cosine in [-1, 1] or none", threshold)
    optim = config.optim_args
    for name in ("learning_rate", "weight_decay", "max_grad_norm"):
        if getattr(optim, name) < 0:
            raise _fail(f"optim_args.{name}", "a number >= 0", getattr(optim, name))
    if not optim.eps > 0:
        raise _fail("optim_args.eps", "a number > 0", optim.eps)
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(optim, name) < 1:
            raise _fail(f"optim_args.{name}", "a number in [0, 1)", getattr(optim, name))
    if not 0 <= optim.min_lr_ratio <= 1:
        raise _fail("optim_args.min_lr_ratio", "a fraction in [0, 1]", optim.min_lr_ratio)
    if not config.topk or any(k < 1 for k in config.topk) or len(set(config.topk)) != len(config.topk):
        raise _fail("topk", "distinct cutoffs >= 1 such as 10,50", config.topk)
    if any(gap < 0 for gap in config.stale_experts):
        raise _fail("stale_experts", "interaction counts >= 0 such as 0,50", config.stale_experts)


def _check_names(config: Config, training: bool) -> None:
    from persrec.models import canonical_model_name
    from persrec.models.registry import is_hf_backbone

    _choice("loss", config.loss, LOSSES)
    _choice("optim_args.scheduler", config.optim_args.scheduler, SCHEDULERS)
    _choice("logger", config.logger, LOGGERS)
    _choice("precision", config.precision, PRECISIONS)
    _choice("strategy", config.strategy, STRATEGIES)
    if config.stage not in ZERO_STAGES:
        raise _fail("stage", f"a DeepSpeed ZeRO stage, {' or '.join(map(str, ZERO_STAGES))}", config.stage)
    try:
        canonical_model_name(config.model)
    except ValueError as error:
        raise ConfigError(f"--model: {error}") from error
    hf = is_hf_backbone(config.model)
    kernels = HF_ATTENTION_IMPLEMENTATIONS if hf else ATTENTION_IMPLEMENTATIONS
    _choice("attention_implementation", config.attention_implementation, kernels)
    measured = measured_metrics(config.topk)
    if training and config.valid_metric not in measured:
        name, _, cutoff = config.valid_metric.lower().partition("@")
        if config.valid_metric.lower() in measured:
            hint = f" (did you mean {config.valid_metric.lower()!r}?)"
        elif f"{name}@{config.topk[0]}" in measured and cutoff.isdigit():
            hint = f" (or add {cutoff} to --topk)"
        else:
            close = difflib.get_close_matches(config.valid_metric.lower(), measured, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"--valid_metric: {config.valid_metric!r} is not measured with --topk {format_value(config.topk)};"
            f" expected one of {', '.join(measured)}{hint}"
        )


def _insertions(value: str | None) -> None:
    """`insert_method` must be 0/none or a JSON list of [offset, count] pairs (what ExpertLayout reads)."""
    expected = "0 or a JSON list of [offset, count] pairs such as '[[100, 2], [400, 2]]'"
    text = (value or "").strip()
    if text.lower() in ("", "0", "none", "null"):
        return
    try:
        pairs = json.loads(text)
    except ValueError:
        raise _fail("insert_method", expected, value) from None
    valid = isinstance(pairs, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(type(n) is int for n in pair) for pair in pairs
    )
    if not valid or not pairs:
        raise _fail("insert_method", expected, value)


def _check_structure(config: Config, training: bool) -> None:
    from persrec.data.sequences import WindowConfig
    from persrec.models.experts import ExpertLayout

    if config.item_embedding_size % config.n_heads and not (config.hstu_qk_dim and config.hstu_v_dim):
        raise ConfigError(
            f"--n_heads: expected a divisor of --item_embedding_size {config.item_embedding_size}, got "
            f"{config.n_heads} (or set --hstu_qk_dim and --hstu_v_dim for HSTU)"
        )
    try:
        WindowConfig(
            max_length=config.MAX_ITEM_LIST_LENGTH,
            feature_max_length=config.train_feat_max_length,
            start_position=config.item_start_position,
            end_position=config.item_end_position,
        )
    except ValueError as error:
        raise ConfigError(f"--{error}") from error
    if config.number_of_user_tokens == 0:
        if not training and (config.compare_cache or config.stale_experts):
            flag = "--compare_cache" if config.compare_cache else "--stale_experts"
            raise ConfigError(f"{flag} needs an expert model (number_of_user_tokens >= 1); this one has none")
        if config.model.lower().startswith("personalized"):
            raise ConfigError(
                f"--number_of_user_tokens: --model {config.model} needs expert tokens; expected an integer >= 1, "
                "got 0"
            )
        return
    history, recent = config.pretrain_item_num, config.recent_item_num
    if history is not None and recent is not None and history + recent != config.MAX_ITEM_LIST_LENGTH:
        raise ConfigError(
            f"--pretrain_item_num {history} + --recent_item_num {recent} = {history + recent}: expected "
            f"--MAX_ITEM_LIST_LENGTH {config.MAX_ITEM_LIST_LENGTH}"
        )
    _insertions(config.insert_method)
    try:
        ExpertLayout.from_options(
            window=config.MAX_ITEM_LIST_LENGTH,
            number_of_user_tokens=config.number_of_user_tokens,
            insert_method=config.insert_method,
            pretrain_item_num=history,
            recent_item_num=recent,
        )
    except (ValueError, TypeError) as error:
        raise ConfigError(f"--insert_method {format_value(config.insert_method)}: {error}") from error


def _check_environment(config: Config, training: bool) -> None:
    from persrec.train.distributed import resolve_device

    resolve_device(config.device)
    if not training:
        return
    if config.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "--logger tensorboard needs the tensorboard package: pip install 'persrec[tensorboard]' "
            "(or use --logger csv)"
        )
    if config.strategy == "deepspeed":
        from persrec.train.deepspeed_config import deepspeed_available, read_deepspeed_file

        if not deepspeed_available():
            raise ConfigError(
                "--strategy deepspeed needs the deepspeed package: pip install 'persrec[deepspeed]' "
                "(or use --strategy fsdp, built in)"
            )
        if config.deepspeed_config:
            read_deepspeed_file(config.deepspeed_config)
        from persrec.models import canonical_model_name

        if config.stage == 3 and config.item_llm_trainable and canonical_model_name(config.model) == "HLLM":
            # Measured with deepspeed 0.19.8: the item LLM, run from the item encoder's methods rather than
            # from a module's forward, trains to different weights (4e-3 off the plain run after 3 steps).
            raise ConfigError(
                "--item_llm_trainable true: DeepSpeed ZeRO-3 does not train HLLM's item LLM correctly; use "
                "--stage 2 or --strategy fsdp"
            )
    elif config.deepspeed_config:
        raise ConfigError(
            f"--deepspeed_config is read by --strategy deepspeed; this run uses {config.strategy}"
        )
    root = Path(config.checkpoint_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--checkpoint_dir {root}: expected a directory, found a file")


def _check_hf(config: Config, training: bool) -> None:
    """The Hugging Face backbones' options: model directories exist locally (no hub) and the text settings.

    Evaluating saved weights needs no model directory when the architecture was saved beside them."""
    from persrec.models.registry import canonical_model_name, is_hf_backbone

    hf_options = ("user_pretrain_dir", "item_pretrain_dir")
    if not is_hf_backbone(config.model):
        for option in hf_options:
            if getattr(config, option):
                raise ConfigError(
                    f"--{option} is read by the LLaMAID and HLLM models only; --model is {config.model}"
                )
        return
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"--model {config.model} needs transformers: pip install 'persrec[hf]'")
    from persrec.hf.loading import resolve_model_dir

    for option in hf_options:
        if getattr(config, option) and training:
            resolve_model_dir(getattr(config, option), option)
    if canonical_model_name(config.model) != "HLLM":
        return
    if not config.item_pretrain_dir:
        raise ConfigError(
            f"--model {config.model} needs --item_pretrain_dir: a local Hugging Face model directory of the item "
            "model (persrec models list shows the ones found on this machine)"
        )
    if not config.text_keys:
        raise _fail("text_keys", "one or more item-table columns such as title,description", config.text_keys)
    if config.MAX_TEXT_LENGTH < 1:
        raise _fail("MAX_TEXT_LENGTH", "an integer >= 1", config.MAX_TEXT_LENGTH)
    if config.item_emb_token_n < 0:
        raise _fail("item_emb_token_n", "an integer >= 0 (0 = mean pooling)", config.item_emb_token_n)
    if config.text_path and not Path(config.text_path).is_file():
        raise ConfigError(
            f"--text_path {config.text_path}: no such file; expected a parquet keyed by item id"
        )


def validate_config(config: Config, *, training: bool = True) -> None:
    """Reject values no run can use, before a run directory, dataset cache or model is created.

    Otherwise such values surface as a traceback deep inside training, or only after the first epoch (an
    unmeasured `valid_metric`). Each message names the flag as it is typed and the accepted range. The model,
    evaluator and device modules are imported here, not at the top, so reading a config stays cheap.
    `training=False` (persrec evaluate) skips what only a training run uses: `valid_metric`, the logger and
    the run directory.
    """
    _check_numbers(config)
    _check_names(config, training)
    _check_structure(config, training)
    _check_hf(config, training)
    _check_environment(config, training)

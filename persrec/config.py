"""Typed run configuration: documented defaults, YAML files merged in order, dotted command-line overrides.

Precedence, lowest first: the defaults below → each `--config_file` in the order given → command-line flags.
Keys keep the names of the original PerSRec/HLLM scripts (`MAX_ITEM_LIST_LENGTH`, `pretrain_item_num`,
`text_keys`, ...). `persrec.train.build` turns the keys into the clearly named configs the library uses inside.
Unknown keys are an error that names the key and suggests the closest one
(case-insensitively, spelled as it must be typed), and `Config.validate` rejects out-of-range values before a run
creates anything on disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from persrec.atomic import atomic_write_text


class ConfigError(ValueError):
    """A configuration key or value the user has to fix."""


# Accepted names of the string-valued options; `validate` checks against these before anything is built.
LOSSES = ("nce",)
SCHEDULERS = ("constant", "cosine")
LOGGERS = ("csv", "tensorboard", "none")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("ddp", "fsdp", "deepspeed")
ZERO_STAGES = (2, 3)
# The dispatcher in persrec.models.hstu_attention accepts these names.
ATTENTION_IMPLEMENTATIONS = ("auto", "native", "tiled", "reference")
# transformers' kernels that honour persrec's 4-D masks exactly (LLaMAID, HLLM).
HF_ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager")
COMMAND_LINE = "the command line"


@dataclass
class OptimArgs:
    """AdamW and its learning-rate schedule (`--optim_args.<name>` on the command line)."""

    # AdamW learning rate (the peak after warmup).
    learning_rate: float = 1e-3
    # AdamW decoupled weight decay.
    weight_decay: float = 0.0
    # AdamW betas; 0.98 follows SASRec/HSTU practice for short training runs.
    beta1: float = 0.9
    beta2: float = 0.98
    # AdamW epsilon (> 0).
    eps: float = 1e-8
    # "constant" or "cosine"; both with linear warmup over `warmup_steps` optimizer steps.
    scheduler: str = "constant"
    # Optimizer steps of linear warmup from 0 to learning_rate (0 = none).
    warmup_steps: int = 0
    # Floor of the cosine schedule as a fraction of learning_rate.
    min_lr_ratio: float = 0.0
    # Gradient-norm clipping; 0 disables it.
    max_grad_norm: float = 1.0


@dataclass
class Config:
    # ---- data ----
    # Built-in name (ml-latest-small, ml-1m, synthetic; raw-file formats such as ebnerd, merrec, amazon-reviews
    # read data_path) or the path of a prepared dataset directory.
    dataset: str = "ml-latest-small"
    # Where named datasets' raw files live (e.g. the folder holding movielens-1m/).
    data_path: str | None = None
    # Where prepared datasets are cached (default: $PERSREC_CACHE_DIR or ~/.cache/persrec).
    cache_dir: str | None = None
    # Items per model input: the item window (for expert models: pretrain_item_num + recent_item_num).
    MAX_ITEM_LIST_LENGTH: int = 200
    # Items loaded from the end of each history before slicing (default: MAX_ITEM_LIST_LENGTH + 1).
    train_feat_max_length: int | None = None
    # Slice [item_start_position, item_end_position] (inclusive; 0/None = to the end) of the loaded items.
    item_start_position: int = 0
    item_end_position: int | None = None
    # Size of the synthetic dataset (users); only for dataset=synthetic.
    synthetic_users: int = 2000
    # ---- model ----
    # SASRec, HSTU, LLaMAID or HLLM (Personalized<name> accepted as aliases, and llama_id / LLMIDRec).
    model: str = "HSTU"
    # Transformer / HSTU blocks.
    n_layers: int = 2
    # Attention heads per block (item_embedding_size must be divisible by it unless HSTU dims are set).
    n_heads: int = 1
    # Item embedding width; also the hidden width of the ID backbones.
    item_embedding_size: int = 50
    # HSTU per-head query/key and value widths (0 = item_embedding_size // n_heads).
    hstu_qk_dim: int = 0
    hstu_v_dim: int = 0
    # SASRec feed-forward width (0 = item_embedding_size).
    inner_size: int = 0
    # Dropout on embeddings and block outputs, in [0, 1).
    hidden_dropout_prob: float = 0.2
    # Std of the item embedding init (small: items are compared by cosine, see BackboneConfig.item_init_std).
    initializer_range: float = 0.02
    # Dropout on attention weights, in [0, 1).
    attn_dropout_prob: float = 0.0
    # HSTU relative attention bias on position and on log-bucketed time gaps.
    relative_position_bias: bool = False
    relative_time_bias: bool = False
    # HSTU attention kernel: auto (fused C kernel or tiled on CPU, batched on CUDA), native, tiled or reference.
    # LLaMAID / HLLM: auto (= sdpa) or eager.
    attention_implementation: str = "auto"
    # ---- Hugging Face backbones (LLaMAID, HLLM) ----
    # User model of LLaMAID / HLLM: a local Hugging Face directory (config.json alone = random weights). None:
    # a Llama with n_layers, n_heads and item_embedding_size as width.
    user_pretrain_dir: str | None = None
    # HLLM item model: a local Hugging Face directory (decoder or encoder) with its tokenizer.
    item_pretrain_dir: str | None = None
    # HLLM: item-table columns that make an item's text ("key: value" each, in this order).
    text_keys: list[str] = field(default_factory=lambda: ["title"])
    # HLLM: parquet of item text keyed by original item id (default: the prepared dataset's item table).
    text_path: str | None = None
    # HLLM: tokens of an item's text kept, prompt included.
    MAX_TEXT_LENGTH: int = 256
    # HLLM: learnable item tokens appended to each item's text; 0 = mean pooling over the text.
    item_emb_token_n: int = 1
    # HLLM: train the item model end to end (true), or freeze it and compute item embeddings once (false).
    item_llm_trainable: bool = False
    # HLLM: text before each item's fields.
    item_prompt: str = "Compress the following sentence into embedding: "
    # ---- personalized experts (PerSRec) ----
    # k expert tokens; 0 = a plain backbone. PersonalizedHSTU / PersonalizedSASRec need k > 0.
    number_of_user_tokens: int = 0
    # 0/None: all k tokens after pretrain_item_num items; or a JSON list of [offset, k_j] with Σ k_j = k.
    insert_method: str | None = None
    # Items in the history part (P) and in the recent window (R); P + R = MAX_ITEM_LIST_LENGTH.
    pretrain_item_num: int | None = None
    recent_item_num: int | None = None
    # Predict from history + experts + recent items (true) or from the recent items alone (false).
    predict_with_full_item_seq: bool = True
    # Training: probability of removing each recent-window item (not attended, not a target), in [0, 1).
    item_dropout: float = 0.0
    # Training: probability of hiding each history item from attention (its target is kept), in [0, 1).
    history_dropout: float = 0.0
    # Loss on every item target of every segment (true) or on the recent window's targets only.
    loss_on_all_items: bool = True
    # Add a per-user learned offset to the shared expert tokens (users unseen in training use the shared ones).
    per_user_expert_tokens: bool = False
    # Evaluate expert models through the expert cache (compress + predict); false = the full masked pass.
    eval_use_cache: bool = True
    # ---- loss ----
    # Only "nce" (sampled softmax on cosine similarity) is implemented.
    loss: str = "nce"
    # Uniformly sampled negatives per draw (see the two options below); 0 needs in_batch_negatives.
    num_negatives: int = 128
    # Draw num_negatives for every sequence of the batch (true) or one set for the whole batch (false). One
    # shared set leaves most items without a push-away gradient for many steps and embeddings collapse.
    negatives_per_sequence: bool = True
    # Draw num_negatives for every position (the generative-recommenders sampler); overrides the above. Memory
    # grows as positions x min(num_negatives x hidden size, number of items).
    negatives_per_position: bool = False
    # Also use the other sequences' targets in the batch as negatives.
    in_batch_negatives: bool = False
    # Gather negatives across torch.distributed ranks.
    gather_negatives: bool = False
    # Softmax temperature on cosine similarities (> 0).
    temperature: float = 0.05
    # True keeps the temperature fixed; False learns it (initialised from `temperature`).
    fix_temp: bool = True
    # Mask a negative whose cosine with the positive exceeds this (None = only identical ids are removed).
    collision_cosine_threshold: float | None = None
    # ---- training ----
    # Passes over the training sequences (an upper bound under early stopping).
    epochs: int = 100
    # Stop after this many optimizer steps in total (0 = no limit); for smoke tests and benchmarks.
    max_steps: int = 0
    # Sequences per optimizer step (per process under torchrun).
    train_batch_size: int = 128
    # Users per evaluation batch.
    eval_batch_size: int = 256
    optim_args: OptimArgs = field(default_factory=OptimArgs)
    # Seed of every random stream (rank r uses seed + r).
    seed: int = 42
    # DataLoader worker processes (0 = load in the training process).
    num_workers: int = 0
    # auto (CUDA when available), cpu, cuda, cuda:1 ...
    device: str = "auto"
    # auto (bf16 autocast on a CUDA device that supports it, fp32 on CPU), fp32 or bf16.
    precision: str = "auto"
    # ---- scale ----
    # How torchrun's processes share training: ddp (a full replica each, gradients averaged), fsdp (FSDP2: every
    # parameter, gradient and optimizer moment sharded block by block) or deepspeed (ZeRO, `--stage`; needs
    # pip install 'persrec[deepspeed]'). Checkpoints are the same files whichever trained them.
    strategy: str = "ddp"
    # DeepSpeed ZeRO stage: 2 partitions optimizer state and gradients, 3 the parameters too.
    stage: int = 2
    # A DeepSpeed config file (JSON or YAML) merged over the one built from these options (none = built only).
    deepspeed_config: str | None = None
    # Recompute each block's activations in the backward pass instead of keeping them: activation memory of
    # one block instead of all, for about one more forward pass of compute. Gradients are unchanged.
    gradient_checkpointing: bool = False
    # ---- validation and early stopping ----
    # Stop after this many evaluations without improvement of `valid_metric`.
    stopping_step: int = 10
    # Metric that selects the best epoch: recall@K, hr@K or ndcg@K for a K in topk, or mrr.
    valid_metric: str = "ndcg@10"
    # False: no validation split, as in the generative-recommenders protocol: the second-to-last item is trained
    # on and epochs are selected on the test item, so the reported test metrics are optimistic (they chose the
    # epoch). For comparing with numbers published under that protocol only.
    validation_split: bool = True
    # Evaluate on the validation split every this many epochs.
    eval_interval: int = 1
    # ---- runs, checkpoints and logging ----
    # Runs are written to checkpoint_dir/run_name (default run_name: model-dataset-timestamp).
    checkpoint_dir: str = "runs"
    run_name: str | None = None
    # Continue a run from its last checkpoint: a run directory, a checkpoint directory, or true (latest run).
    resume: str | None = None
    # Save a checkpoint every this many optimizer steps as well as after every epoch (0 = per epoch only).
    save_every_steps: int = 0
    # csv, tensorboard or none.
    logger: str = "csv"
    # Show progress bars while preparing data, training and evaluating.
    show_progress: bool = True
    # ---- evaluation ----
    # Cutoffs K of recall@K, hr@K and ndcg@K (distinct positive integers, e.g. 10,50).
    topk: list[int] = field(default_factory=lambda: [5, 10, 50, 200])
    # Remove the items already in the user's history from the ranking (printed with every result).
    filter_seen: bool = False
    # Only evaluate the given checkpoint (or the initial model) on the validation split.
    val_only: bool = False
    # persrec evaluate, expert models: also score through the full masked pass and show both.
    compare_cache: bool = False
    # persrec evaluate: score weights on a dataset other than the one they were trained on (refused by default).
    allow_dataset_mismatch: bool = False
    # persrec evaluate, expert models: staleness study; for each N, experts are compressed from history that
    # ends N interactions before the recent window (as if not refreshed for N interactions).
    stale_experts: list[int] = field(default_factory=list)
    # Also evaluate a popularity baseline next to the model.
    popularity_baseline: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return apply_overrides(self, changes)

    def validate(self, *, training: bool = True) -> Config:
        """Raise a ConfigError naming the first value no run can use (see `validate_config`); else self."""
        from persrec.config_validation import validate_config

        validate_config(self, training=training)
        return self


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _label(key: str, where: str) -> str:
    """A key spelled as the user types it: `--key` on the command line, `key in FILE` in a config file."""
    return f"--{key}" if where == COMMAND_LINE else f"{key} in {where}"


def config_keys() -> list[str]:
    """Every settable key, sections' fields dotted (`optim_args.learning_rate`)."""
    keys: list[str] = []
    for name, annotation in _fields(Config).items():
        if dataclasses.is_dataclass(annotation):
            keys += [f"{name}.{inner}" for inner in _fields(annotation)]
        else:
            keys.append(name)
    return keys


def suggest_key(key: str, known: list[str] | None = None) -> str | None:
    """The known key the user most likely meant, spelled so that it is valid as typed.

    Tried in order: the same key in another case (`max_item_list_length`), a section field given without its
    section or under the wrong one (`learning_rate` → `optim_args.learning_rate`), then the closest spelling of
    the whole dotted key and of its last part.
    """
    known = config_keys() if known is None else known
    lowered = {k.lower(): k for k in known}
    leaves: dict[str, str] = {}
    for k in known:
        leaves.setdefault(k.rsplit(".", 1)[-1].lower(), k)
    typed = key.lower()
    leaf = typed.rsplit(".", 1)[-1]
    if typed in lowered:
        return lowered[typed]
    if leaf in leaves:
        return leaves[leaf]
    close = difflib.get_close_matches(typed, list(lowered), n=1, cutoff=0.6)
    if close:
        return lowered[close[0]]
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    return leaves[close[0]] if close else None


def _unknown_key(key: str, where: str) -> ConfigError:
    close = suggest_key(key)
    if where == COMMAND_LINE:
        hint = f"; did you mean --{close}?" if close else "; persrec train --help lists the keys"
        return ConfigError(f"unknown option --{key}{hint}")
    hint = f"; did you mean {close!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off"}:
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join([*names, "none"])
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    return getattr(annotation, "__name__", str(annotation))


def format_value(value: Any) -> str:
    """A value as it would be typed on the command line (`true`, `none`, `5,10`)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "[]"
    return str(value)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, with a message naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in {"none", "null", ""}):
            return None
        return _coerce(value, options[0], key)
    if dataclasses.is_dataclass(annotation):
        raise ConfigError(f"{key} is a section; set its fields with {key}.<name>")
    try:
        if annotation is bool:
            return _parse_bool(value, key)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return value if isinstance(value, str) else json.dumps(value)
        if origin is list:
            (inner,) = typing.get_args(annotation)
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            if not isinstance(value, list | tuple):
                value = [value]
            return [_coerce(v, inner, key) for v in value]
    except ConfigError:
        raise
    except (TypeError, ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r}") from error
    return value


def _set(target: Any, dotted: str, value: Any, where: str, prefix: str = "") -> None:
    """Set `dotted` (relative to `target`, which sits at `prefix` in the config) from a file or flag value."""
    head, _, rest = dotted.partition(".")
    fields = _fields(type(target))
    if head not in fields:
        raise _unknown_key(prefix + dotted, where)
    annotation = fields[head]
    if dataclasses.is_dataclass(annotation):
        section = getattr(target, head)
        if rest:
            _set(section, rest, value, where, f"{prefix}{head}.")
            return
        if not isinstance(value, dict):
            raise ConfigError(
                f"{_label(prefix + head, where)} is a section: set its fields as {prefix}{head}.<name>"
            )
        for name, inner in value.items():
            _set(section, str(name), inner, where, f"{prefix}{head}.")
        return
    if rest:
        raise _unknown_key(prefix + dotted, where)
    setattr(target, head, _coerce(value, annotation, _label(prefix + head, where)))


def apply_overrides(config: Config, overrides: dict[str, Any], where: str = "overrides") -> Config:
    """A copy of `config` with dotted keys set (`{"optim_args.learning_rate": 1e-4}` or nested dicts)."""
    result = dataclasses.replace(config, optim_args=dataclasses.replace(config.optim_args))
    for key, value in overrides.items():
        _set(result, str(key), value, where)
    return result


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open(encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = error.problem or error.context or "invalid syntax"
        start = error.context_mark
        if error.context and start is not None and mark is not None and start.line != mark.line:
            problem += f" ({error.context} started at line {start.line + 1})"
        raise ConfigError(f"config file {where}: invalid YAML: {problem}") from error
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"config file {path} is not readable YAML: {reason}") from error
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def parse_cli_overrides(args: list[str]) -> dict[str, Any]:
    """`["--a", "1", "--b.c", "x", "--flag"]` -> {"a": "1", "b.c": "x", "flag": "true"}; also `--a=1`."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(args):
        token = args[index]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: options look like --key value")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            index += 1
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            value = args[index + 1]
            index += 2
        else:
            value = "true"
            index += 1
        overrides[key] = value
    return overrides


def load_config(files: list[str | Path] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then each YAML file in order, then overrides (typically from the command line)."""
    config = Config()
    for path in files or []:
        config = apply_overrides(config, load_yaml(path), where=str(path))
    if overrides:
        config = apply_overrides(config, overrides, where=COMMAND_LINE)
    return config


def save_config(config: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))

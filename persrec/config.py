"""Typed run configuration: documented defaults, YAML files merged in order, dotted command-line overrides.

Precedence, lowest first: the defaults below → each `--config_file` in the order given → command-line flags.
Keys keep the names of the original PerSRec/HLLM scripts (`MAX_ITEM_LIST_LENGTH`, `pretrain_item_num`, ...) for
the ID backbones, SASRec and HSTU; the text (HLLM) and Hugging Face options of those scripts are named as not
supported yet. `persrec.train.build` turns the keys into the clearly named configs the library uses inside. Unknown keys are an error that names the key and suggests the closest one
(case-insensitively, spelled as it must be typed), and `Config.validate` rejects out-of-range values before a run
creates anything on disk.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
import re
import textwrap
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
# The dispatcher in persrec.models.hstu_attention accepts these names.
ATTENTION_IMPLEMENTATIONS = ("auto", "native", "tiled", "reference")
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
    # Built-in name (ml-latest-small, ml-1m, synthetic) or the path of a prepared dataset directory.
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
    # SASRec or HSTU (PersonalizedSASRec / PersonalizedHSTU accepted as aliases).
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
    attention_implementation: str = "auto"
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
    # auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.
    precision: str = "auto"
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


# Options of the original PerSRec/HLLM scripts for backbones persrec does not have yet: a user porting a script
# should read that, not a suggestion of some similarly spelled key.
NOT_SUPPORTED_YET = {
    name.lower(): name
    for name in (
        "MAX_TEXT_LENGTH",
        "text_keys",
        "text_path",
        "item_pretrain_dir",
        "user_pretrain_dir",
        "item_emb_token_n",
        "item_llm_trainable",
        "gradient_checkpointing",
        "strategy",
        "stage",
    )
}


def _unknown_key(key: str, where: str) -> ConfigError:
    original = NOT_SUPPORTED_YET.get(key.lower())
    if original is not None:
        return ConfigError(
            f"--{original} (in {where}) is an option of the text and Hugging Face backbones (HLLM, LLaMA-ID), "
            "which are not supported yet; persrec trains the ID backbones SASRec and HSTU"
        )
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


# --------------------------------------------------------------------------------------------------- reference

_SECTION_MARK = re.compile(r"#\s*-{2,}\s*(.+?)\s*-{2,}$")


@dataclass(frozen=True)
class KeyHelp:
    """One line of `persrec train --help`: a key, its section, type, default and documentation."""

    key: str
    section: str
    type: str
    default: Any
    doc: str


def _comment_docs(cls: type) -> dict[str, tuple[str, str]]:
    """Field name -> (section, doc), read from the comments above each field in the class's source.

    The comments next to the defaults are the documentation, so `--help` reads them rather than a copy. A
    comment documents the field below it and the fields that follow with no line in between (`hstu_qk_dim`,
    `hstu_v_dim`); a `# ---- name ----` line opens a section.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: keys and defaults are still listed
        return {}
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef)
    lines = source.splitlines()
    docs: dict[str, tuple[str, str]] = {}
    section, doc, previous_end = "", "", node.lineno
    for item in node.body:
        between = lines[previous_end : item.lineno - 1]
        previous_end = item.end_lineno or item.lineno
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        comments: list[str] = []
        for line in between:
            text = line.strip()
            if mark := _SECTION_MARK.fullmatch(text):
                section, comments = mark.group(1), []
            elif text.startswith("#"):
                comments.append(text.lstrip("#").strip())
            else:
                comments = []
        if between:
            doc = " ".join(comments)
        docs[item.target.id] = (section, doc)
    return docs


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


def config_reference(base: Config | None = None) -> list[KeyHelp]:
    """Every key in declaration order with its section, type, value in `base` (default: the defaults) and doc."""
    base = Config() if base is None else base
    top = _comment_docs(Config)
    rows: list[KeyHelp] = []
    for name, annotation in _fields(Config).items():
        section, doc = top.get(name, ("", ""))
        if dataclasses.is_dataclass(annotation):
            inner_docs = _comment_docs(annotation)
            title = f"optimiser ({name}.*)" if annotation is OptimArgs else name
            for inner, inner_type in _fields(annotation).items():
                value = getattr(getattr(base, name), inner)
                inner_doc = inner_docs.get(inner, ("", ""))[1]
                rows.append(KeyHelp(f"{name}.{inner}", title, _type_name(inner_type), value, inner_doc))
            continue
        rows.append(KeyHelp(name, section, _type_name(annotation), getattr(base, name), doc))
    return rows


# --------------------------------------------------------------------------------------------------- validation


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

    _choice("loss", config.loss, LOSSES)
    _choice("optim_args.scheduler", config.optim_args.scheduler, SCHEDULERS)
    _choice("logger", config.logger, LOGGERS)
    _choice("precision", config.precision, PRECISIONS)
    _choice("attention_implementation", config.attention_implementation, ATTENTION_IMPLEMENTATIONS)
    try:
        canonical_model_name(config.model)
    except ValueError as error:
        raise ConfigError(f"--model: {error}") from error
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
    root = Path(config.checkpoint_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--checkpoint_dir {root}: expected a directory, found a file")


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
    _check_environment(config, training)

"""The DeepSpeed config of a run, built from persrec's options (readable without deepspeed installed).

persrec keeps the optimizer, its schedule and the batch size under its own options (`--optim_args.*`,
`--train_batch_size`), so runs compare across strategies; a `--deepspeed_config` file may tune everything else
(ZeRO buckets, offloading, communication) and is refused where it would set those.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import yaml

from persrec.config import Config, ConfigError

# DeepSpeed keys persrec sets from its own options: (key, the option that sets it).
OWNED_KEYS = {
    "optimizer": "--optim_args.*",
    "scheduler": "--optim_args.scheduler",
    "train_batch_size": "--train_batch_size",
    "train_micro_batch_size_per_gpu": "--train_batch_size",
    "gradient_accumulation_steps": "--train_batch_size",
    "gradient_clipping": "--optim_args.max_grad_norm",
}
EXTRA = "pip install 'persrec[deepspeed]'"


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def require_deepspeed() -> Any:
    """The deepspeed module, or a ConfigError naming the extra to install."""
    if not deepspeed_available():
        raise ConfigError(f"--strategy deepspeed needs the deepspeed package: {EXTRA}")
    import deepspeed

    return deepspeed


def read_deepspeed_file(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed config file as a mapping (JSON, or YAML read with safe_load)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed_config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"--deepspeed_config {path}: not readable JSON or YAML ({reason})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a mapping of DeepSpeed keys")
    owned = [key for key in data if key in OWNED_KEYS]
    if owned:
        key = owned[0]
        raise ConfigError(
            f"--deepspeed_config {path}: {key!r} is set by persrec from {OWNED_KEYS[key]}; remove it from the file"
        )
    return data


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


def deepspeed_config(config: Config, world_size: int, bf16: bool) -> dict[str, Any]:
    """ZeRO `config.stage`, persrec's batch size and clipping, bf16 when the run's precision is bf16."""
    built: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.train_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": config.train_batch_size * world_size,
        "gradient_clipping": config.optim_args.max_grad_norm,
        "zero_optimization": {"stage": config.stage},
        "bf16": {"enabled": bf16},
        # persrec's AdamW (torch.optim) is the client optimizer: same update rule under every strategy.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if config.deepspeed_config:
        built = _merged(built, read_deepspeed_file(config.deepspeed_config))
    return built

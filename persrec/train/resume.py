"""Which checkpoint a `--resume` continues, and the configuration it continues with.

A resumed run is rebuilt from the configuration it was saved with, never from defaults plus the command line:
anything else would either fail on mismatched shapes or, worse, silently continue a different experiment.
Flags given with `--resume` may change only what leaves the trajectory of the run as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persrec.config import Config, ConfigError, apply_overrides, load_config, load_yaml
from persrec.train import checkpoint as ckpt

# Keys that do not change what the run computes: how long it goes on, how it is watched, where files live.
RESUME_MAY_CHANGE = frozenset(
    {
        "epochs",
        "max_steps",
        "stopping_step",
        "resume",
        "run_name",
        "checkpoint_dir",
        "data_path",
        "cache_dir",
        "num_workers",
        "show_progress",
        "logger",
        "save_every_steps",
        "eval_batch_size",
        "popularity_baseline",
        "val_only",
        "compare_cache",
        "stale_experts",
        # recomputing activations gives bit-identical gradients: a run that ran out of memory can resume with it
        "gradient_checkpointing",
    }
)


def wants_resume(config: Config) -> bool:
    return bool(config.resume) and str(config.resume).strip().lower() not in {"false", "0", "no", "none"}


def find_resume_checkpoint(config: Config) -> Path:
    """`resume` may be true (the run `run_name` under checkpoint_dir, or the newest run there) or a path."""
    if str(config.resume).strip().lower() in {"true", "1", "yes", "latest"}:
        root = Path(config.checkpoint_dir)
        if config.run_name:
            target: Path | None = root / config.run_name
        else:
            runs = sorted(
                (p for p in root.glob("*") if p.is_dir() and ckpt.latest_checkpoint(p)),
                key=lambda p: p.stat().st_mtime,
            )
            target = runs[-1] if runs else None
    else:
        target = Path(str(config.resume))
    found = ckpt.latest_checkpoint(target) if target is not None and target.is_dir() else None
    if found is None:
        where = target if target is not None else Path(config.checkpoint_dir)
        raise ConfigError(f"--resume {config.resume}: no complete checkpoint found in {where}")
    return found


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (None for a checkpoint copied out of its run)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def _value(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# Keys naming files or directories, stored resolved in a run's config.
PATH_KEYS = ("dataset", "user_pretrain_dir", "item_pretrain_dir", "text_path")


def _canonical(key: str, value: Any) -> Any:
    if key in PATH_KEYS and isinstance(value, str) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def explicit_keys(file_values: list[dict[str, Any]], overrides: dict[str, Any]) -> list[str]:
    """Dotted keys the user set in config files or on the command line."""
    keys: list[str] = []

    def walk(prefix: str, mapping: dict[str, Any]) -> None:
        for key, value in mapping.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and dotted == "optim_args":
                walk(f"{dotted}.", value)
            else:
                keys.append(dotted)

    for values in [*file_values, overrides]:
        walk("", values)
    return list(dict.fromkeys(keys))


def resumed_config(saved: Config, requested: Config, keys: list[str]) -> Config:
    """The saved config with the allowed requested changes; any other differing key is an error naming it."""
    changes: dict[str, Any] = {}
    for key in keys:
        theirs, ours = _canonical(key, _value(saved, key)), _canonical(key, _value(requested, key))
        if theirs == ours:
            continue
        if key.split(".")[0] not in RESUME_MAY_CHANGE:
            allowed = ", ".join(f"--{k}" for k in sorted(RESUME_MAY_CHANGE - {"resume"}))
            raise ConfigError(
                f"--{key} {ours} differs from the resumed run's {theirs}: a resumed run keeps the "
                f"configuration it was started with; only {allowed} may change (start a new run instead)"
            )
        changes[key] = ours
    return apply_overrides(saved, changes, where="the command line")


def training_finished(state: ckpt.TrainerState, config: Config) -> bool:
    """Nothing left to train: early stopping fired, the epochs are done or max_steps is reached."""
    reached_max = bool(config.max_steps) and state.global_step >= config.max_steps
    return state.stopped_early or state.epoch >= config.epochs or reached_max


def training_config(files: list[str], overrides: dict[str, Any]) -> tuple[Config, Path | None]:
    """The config a `persrec train` command line asks for, and the checkpoint it resumes (or None)."""
    requested = load_config(files, overrides)
    if not wants_resume(requested):
        return requested, None
    checkpoint = find_resume_checkpoint(requested)
    saved = ckpt.load_checkpoint_config(checkpoint)
    keys = explicit_keys([load_yaml(f) for f in files], overrides)
    return resumed_config(saved, requested, keys), checkpoint


def finished_run_message(checkpoint: Path, config: Config) -> str | None:
    """What to say when asked to resume a run that already finished and reported (None: it has work left)."""
    run_dir = run_dir_of(checkpoint)
    state = ckpt.load_trainer_state(checkpoint)
    if run_dir is None or not (run_dir / "results.json").is_file() or not training_finished(state, config):
        return None
    why = "stopped early" if state.stopped_early else f"trained {state.epoch} epochs"
    return (
        f"{run_dir} already finished ({why}, {state.global_step} steps, best epoch {state.best_epoch}); "
        f"results: {run_dir / 'results.json'}; pass a larger --epochs to train it further"
    )

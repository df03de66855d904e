"""Checkpoints that survive being killed at any moment.

A checkpoint is a directory: `model.safetensors` (weights), `config.yaml`, `optimizer.pt` (optimizer, scheduler
and loss state), `trainer_state.json` (epoch, step, best metric, early-stopping counter) and `rng.pt` (every RNG the
run draws from). It is written to a temporary sibling and renamed into place, and the `latest` pointer is replaced
atomically afterwards, so a reader only ever sees complete checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from persrec.atomic import atomic_path, atomic_write_text
from persrec.config import Config, load_config, save_config

LATEST = "latest"


@dataclass
class TrainerState:
    epoch: int = 0
    # Batches of `epoch` already trained (a checkpoint taken mid-epoch resumes after them).
    batch_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    evaluations_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone every tensor to own its memory.
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}


def save_weights(model: torch.nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(_state_dict_for_saving(model), str(tmp))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    name: str,
    *,
    model: torch.nn.Module,
    config: Config,
    optimizer_state: dict[str, Any],
    trainer_state: TrainerState,
    generators: dict[str, torch.Generator],
    keep: int = 2,
) -> Path:
    """Write checkpoint `run_dir/checkpoints/<name>` atomically, point `latest` at it, prune old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_state_dict_for_saving(model), str(tmp / "model.safetensors"))
    save_config(config, tmp / "config.yaml")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_state(generators), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(trainer_state), indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, name)
    step_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")),
        key=lambda p: int(p.name[5:]),
    )
    for old in step_dirs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint under a run directory (or `path` itself if it is a checkpoint)."""
    if (path / "model.safetensors").is_file():
        return path
    pointer = path / "checkpoints" / LATEST
    if pointer.is_file():
        candidate = path / "checkpoints" / pointer.read_text().strip()
        if (candidate / "trainer_state.json").is_file():
            return candidate
    return None


def load_checkpoint_config(checkpoint: Path) -> Config:
    return load_config([checkpoint / "config.yaml"])


def load_trainer_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / "trainer_state.json").read_text()))

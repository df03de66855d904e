"""Checkpoints that survive being killed at any moment, and whose files never execute code when loaded.

A checkpoint is a directory `checkpoints/step-N/`: `model.safetensors` (weights), `config.yaml`, `optimizer.pt`
(optimizer, scheduler and loss state: tensors and plain values only, loaded with `weights_only=True`),
`rng.json` (every RNG stream of every rank, as plain numbers), `dataset.json` (the fingerprint of the data it
was trained on) and `trainer_state.json` (epoch, step, best metric, early-stopping counter, per-epoch records),
written last. The sequence never leaves a moment without a complete checkpoint on disk:

1. everything is written into a temporary sibling, `trainer_state.json` last;
2. an older directory of the same name is renamed aside (never deleted before its replacement is complete);
3. the temporary directory is renamed into place;
4. the `latest` pointer is replaced atomically;
5. only then are the set-aside directory and checkpoints beyond `keep` removed.

A reader that finds `latest` missing or naming an incomplete directory falls back to the newest complete
checkpoint, including one set aside in step 2.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from persrec.atomic import atomic_path, atomic_write_json, atomic_write_text
from persrec.config import Config, ConfigError, load_config, save_config
from persrec.data.store import ITEM_IDS_FILE, USER_IDS_FILE

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
    # The running loss sum and wall time of the unfinished epoch, so a resumed epoch reports the whole epoch.
    epoch_loss_sum: float = 0.0
    epoch_seconds: float = 0.0
    # Wall time of the run so far, over every process that trained it.
    elapsed_seconds: float = 0.0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def _state_dict_for_saving(model: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's state dict, or a state dict already gathered (a sharded run's full state dict)."""
    state = model if isinstance(model, dict) else model.state_dict()
    # safetensors refuses shared storage; clone every tensor to own its memory.
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(_state_dict_for_saving(model), str(tmp))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors weights file; a damaged one is a ConfigError naming the file."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{path} is not a readable safetensors weights file ({error})") from error


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights; a damaged file or one for another model is a ConfigError naming the file."""
    load_state(model, read_weights(path), path)


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a state read from `path` (named in the errors); every key must match the model's, shapes too."""
    own = model.state_dict()
    wrong = [
        f"{key} {tuple(value.shape)} (model: {tuple(own[key].shape)})"
        for key, value in state.items()
        if key in own and value.shape != own[key].shape
    ]
    if wrong:
        raise ConfigError(f"{path} does not match the model: shapes {', '.join(wrong[:3])}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


CHECKPOINT_FILES = ("model.safetensors", "config.yaml", "optimizer.pt", "rng.json", "trainer_state.json")
_STEP_NAME = re.compile(r"^step-(\d+)$")
_SET_ASIDE_NAME = re.compile(r"^\.step-(\d+)\.replaced-\d+$")


def _tensor_to_list(tensor: torch.Tensor) -> list[int]:
    return tensor.cpu().tolist()


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """This process's RNG streams as JSON-able numbers (nothing that needs unpickling to read back)."""
    version, mt_state, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": {
            **numpy_state,
            "state": {"key": numpy_state["state"]["key"].tolist(), "pos": int(numpy_state["state"]["pos"])},
        },
        "torch": _tensor_to_list(torch.get_rng_state()),
        "generators": {name: _tensor_to_list(g.get_state()) for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_to_list(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {
        "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
        "pos": numpy_state["state"]["pos"],
    }
    np.random.set_state(numpy_state)
    torch.set_rng_state(_byte_tensor(state["torch"]))
    for name, generator in generators.items():
        generator.set_state(_byte_tensor(state["generators"][name]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def save_checkpoint(
    run_dir: Path,
    name: str,
    *,
    model: torch.nn.Module | dict[str, torch.Tensor],
    config: Config,
    optimizer_state: dict[str, Any],
    trainer_state: TrainerState,
    rng_states: list[dict[str, Any]],
    dataset_fingerprint: dict[str, Any] | None = None,
    keep: int = 2,
    on_stage: Callable[[str], None] | None = None,
) -> Path:
    """Write checkpoint `run_dir/checkpoints/<name>` (rng_states: one per rank, in rank order).

    `on_stage(stage)` is called between the steps of the sequence in the module docstring; tests use it to stop
    the sequence at each point as a kill would.
    """
    stage = on_stage or (lambda _: None)
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # only ever a leftover of this process id's own earlier attempt
    tmp.mkdir()
    save_file(_state_dict_for_saving(model), str(tmp / "model.safetensors"))
    save_config(config, tmp / "config.yaml")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "rng.json").write_text(json.dumps({"world_size": len(rng_states), "ranks": rng_states}))
    if dataset_fingerprint is not None:
        (tmp / "dataset.json").write_text(json.dumps(dataset_fingerprint, indent=1))
    stage("files written")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(trainer_state), indent=1))
    stage("temporary checkpoint complete")
    aside = root / f".{name}.replaced-{os.getpid()}"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        stage("old checkpoint set aside")
    os.replace(tmp, final)
    stage("checkpoint in place")
    atomic_write_text(root / LATEST, name)
    stage("latest updated")
    # This save's set-aside copy, and temporaries or set-aside copies of saves killed earlier.
    for leftover in [*root.glob(".step-*.tmp-*"), *root.glob(".step-*.replaced-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    for old in _complete_checkpoints(root)[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(checkpoint: Path) -> bool:
    return all((checkpoint / file).is_file() for file in CHECKPOINT_FILES)


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step-N` directories under `root`, oldest first."""
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_NAME.match(p.name)) and is_complete(p)
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint under a run directory (or `path` itself if it is a checkpoint).

    `latest` names it; when the pointer is missing or names an incomplete directory (a kill between the steps
    of `save_checkpoint`), the newest complete `step-N` is used, or one set aside while being replaced.
    """
    if is_complete(path):
        return path
    root = path / "checkpoints"
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _STEP_NAME.match(candidate.name) and is_complete(candidate):
            return candidate
    candidates: list[tuple[int, int, Path]] = [(int(p.name[5:]), 1, p) for p in _complete_checkpoints(root)]
    for p in root.iterdir():
        if (m := _SET_ASIDE_NAME.match(p.name)) and is_complete(p):
            candidates.append((int(m.group(1)), 0, p))
    return max(candidates, key=lambda c: c[:2])[2] if candidates else None


def load_checkpoint_config(checkpoint: Path) -> Config:
    return load_config([checkpoint / "config.yaml"])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not a readable checkpoint file ({error})") from error


def load_trainer_state(checkpoint: Path) -> TrainerState:
    data = _read_json(checkpoint / "trainer_state.json")
    try:
        return TrainerState(**data)
    except TypeError as error:
        raise ConfigError(
            f"{checkpoint / 'trainer_state.json'} does not hold a trainer state ({error})"
        ) from error


def load_optimizer_state(checkpoint: Path, device: torch.device) -> dict[str, Any]:
    """Optimizer, scheduler and loss state; `weights_only=True`, so a crafted file cannot run code."""
    path = checkpoint / "optimizer.pt"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"{path} is not a checkpoint file persrec can load safely (it holds something other than "
            f"tensors and plain values: {first}); refusing to resume from it"
        ) from error
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "loss"} <= set(state):
        raise ConfigError(f"{path} does not hold optimizer, scheduler and loss state")
    return state


def load_rng_state(checkpoint: Path, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's RNG streams; the run must resume with the number of processes it was saved with."""
    path = checkpoint / "rng.json"
    data = _read_json(path)
    saved = data.get("world_size") if isinstance(data, dict) else None
    if saved != world_size:
        raise ConfigError(
            f"{path}: the run was saved by {saved} process(es) but is resumed with {world_size}; resume it "
            f"with the same number of processes (torchrun --nproc_per_node / --nnodes) to continue it exactly"
        )
    return data["ranks"][rank]


def save_model_files(
    directory: Path,
    config: Config,
    fingerprint: dict[str, Any],
    dataset_dir: Path,
    model: torch.nn.Module | None = None,
) -> None:
    """What a set of weights needs to be used on its own (best/): config, dataset fingerprint, item id map,
    and the backbone's architecture files (a Hugging Face decoder's config) when `model` has any.

    The id map turns the model's dense item indices back into the dataset's original item ids; it is copied
    only when missing or different, since a large catalogue's map is not small. A model with per-user expert
    tokens also gets the user id map (serving finds a user's tokens by the original user id).
    """
    directory.mkdir(parents=True, exist_ok=True)
    id_map = directory / ITEM_IDS_FILE
    recorded = load_dataset_fingerprint(directory) if id_map.is_file() else None
    changed = recorded is None or recorded.get("item_id_map_sha256") != fingerprint["item_id_map_sha256"]
    if changed:
        with atomic_path(id_map) as tmp:
            shutil.copyfile(dataset_dir / ITEM_IDS_FILE, tmp)
    user_map = directory / USER_IDS_FILE
    if config.per_user_expert_tokens and (changed or not user_map.is_file() or recorded != fingerprint):
        with atomic_path(user_map) as tmp:
            shutil.copyfile(dataset_dir / USER_IDS_FILE, tmp)
    save_config(config, directory / "config.yaml")
    atomic_write_json(directory / "dataset.json", fingerprint)
    if model is not None:
        backbone = getattr(model, "module", model).backbone
        for name, text in backbone.architecture_files().items():
            atomic_write_text(directory / name, text)


def save_item_table(directory: Path, table: torch.Tensor) -> None:
    """A trainable item LLM's item vectors beside the weights they were computed with (their hash is
    recorded, so serving never pairs a table with other weights)."""
    from persrec.data.fingerprint import sha256_file
    from persrec.models.hllm import ITEM_TABLE_FILE

    metadata = {"weights_sha256": sha256_file(directory / "model.safetensors")}
    with atomic_path(directory / ITEM_TABLE_FILE) as tmp:
        save_file({"item_table": table.float().cpu().contiguous()}, str(tmp), metadata=metadata)


def load_dataset_fingerprint(directory: Path) -> dict[str, Any] | None:
    """The fingerprint recorded beside weights, or None for weights saved without one."""
    path = directory / "dataset.json"
    return _read_json(path) if path.is_file() else None

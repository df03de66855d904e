"""Resume that always works: safe checkpoint files, the saved config, every kill window, logs, signals, ranks."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persrec.cli import main
from persrec.config import load_config
from persrec.train import checkpoint as ckpt
from persrec.train.distributed import DistributedContext
from persrec.train.trainer import Trainer
from tests.conftest import cli_flags, kill_process_tree, tiny_overrides, torchrun_command

ROOT = Path(__file__).parents[2]


def _train(overrides: dict) -> Trainer:
    trainer = Trainer(load_config(overrides=overrides), DistributedContext())
    trainer.fit()
    return trainer


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run) / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _metrics_rows(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-time column (the only one that differs between two identical runs)."""
    with (run / "metrics.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


# ---- no file of a run directory executes code -------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_optimizer_file_is_refused_and_never_runs(tiny_dataset, tmp_path, capsys):
    _train(tiny_overrides(tiny_dataset, tmp_path, epochs=1, popularity_baseline="false"))
    run = tmp_path / "run"
    checkpoint = ckpt.latest_checkpoint(run)
    marker = tmp_path / "payload-ran"
    torch.save({"optimizer": _Payload(marker), "scheduler": {}, "loss": {}}, checkpoint / "optimizer.pt")
    # the payload is live: unpickling it the unsafe way runs it
    assert torch.load(checkpoint / "optimizer.pt", weights_only=False) and marker.exists()
    marker.unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.pt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_rng_state_is_plain_json_and_a_pickled_rng_file_is_never_read(tiny_dataset, tmp_path, capsys):
    _train(tiny_overrides(tiny_dataset, tmp_path, epochs=1, popularity_baseline="false"))
    run = tmp_path / "run"
    checkpoint = ckpt.latest_checkpoint(run)
    json.loads((checkpoint / "rng.json").read_text())  # plain data
    marker = tmp_path / "payload-ran"
    torch.save(_Payload(marker), checkpoint / "rng.pt")
    (checkpoint / "rng.json").unlink()  # a checkpoint of the old layout: rng.pt only
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_rng_state_round_trips_every_stream():
    generator = torch.Generator().manual_seed(7)
    saved = json.loads(json.dumps(ckpt.rng_state({"negatives": generator})))
    import random

    import numpy as np

    expected = (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=generator).item(),
    )
    ckpt.restore_rng_state(saved, {"negatives": generator})
    assert (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=generator).item(),
    ) == (expected)


# ---- no kill window leaves a run unresumable --------------------------------------------------------------
STAGES = ["files written", "temporary checkpoint complete", "old checkpoint set aside", "checkpoint in place"]


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after the stage runs, and save_checkpoint has no cleanup handlers."""


def _save(run: Path, name: str, step: int, stop_at: str | None = None) -> None:
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, float(step))

    def on_stage(stage: str) -> None:
        if stage == stop_at:
            raise _Killed(stage)

    ckpt.save_checkpoint(
        run,
        name,
        model=model,
        config=load_config(),
        optimizer_state={"optimizer": {}, "scheduler": {}, "loss": {}},
        trainer_state=ckpt.TrainerState(global_step=step),
        rng_states=[ckpt.rng_state({})],
        on_stage=on_stage,
    )


KILL_POINTS = [
    (stage, same)
    for same in (False, True)
    for stage in [*STAGES, "latest updated"]
    if same or stage != "old checkpoint set aside"  # only a same-name save sets one aside
]


@pytest.mark.parametrize("stage, replace_same_name", KILL_POINTS)
def test_a_kill_at_any_point_of_a_save_leaves_a_complete_checkpoint(tmp_path, stage, replace_same_name):
    _save(tmp_path, "step-1", 1)
    _save(tmp_path, "step-2", 2)
    name, step = ("step-2", 3) if replace_same_name else ("step-3", 3)
    with pytest.raises(_Killed):
        _save(tmp_path, name, step, stop_at=stage)
    found = ckpt.latest_checkpoint(tmp_path)
    assert found is not None and ckpt.is_complete(found)
    state = ckpt.load_trainer_state(found)
    assert state.global_step in (2, 3)  # the newest complete state: before or after the interrupted save
    weight = load_file(str(found / "model.safetensors"))["weight"]
    assert torch.all(weight == state.global_step)  # the weights belong to that state
    if stage == "latest updated" or (replace_same_name and stage == "checkpoint in place"):
        assert state.global_step == 3  # the pointer names the new checkpoint
    _save(tmp_path, "step-4", 4)  # saving goes on as usual afterwards
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path)).global_step == 4
    assert not list((tmp_path / "checkpoints").glob(".step-*")), "temporaries are cleaned up"


def test_a_missing_or_stale_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    _save(tmp_path, "step-1", 1)
    _save(tmp_path, "step-2", 2)
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step-9")
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-2"
    (root / "latest").unlink()
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-2"
    (root / "step-2" / "rng.json").unlink()  # incomplete
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-1"


# ---- resume from the saved config ------------------------------------------------------------------------
def test_resume_rebuilds_the_run_from_its_saved_config(tiny_dataset, tmp_path, capsys):
    overrides = tiny_overrides(tiny_dataset, tmp_path, epochs=1, popularity_baseline="false")
    _train(overrides)
    run = tmp_path / "run"
    capsys.readouterr()
    # no model flags at all: the defaults (item_embedding_size 50, ...) would not fit the saved weights
    assert main(["train", "--resume", str(run), "--epochs", "2", "--show_progress", "false"]) == 0
    assert json.loads((run / "results.json").read_text())["epochs_trained"] == 2
    # the README's form: --resume true --run_name N --checkpoint_dir D, repeating unchanged flags is fine
    assert main(["train", *cli_flags({**overrides, "epochs": 3}), "--resume", "true"]) == 0
    assert json.loads((run / "results.json").read_text())["epochs_trained"] == 3
    assert load_config([run / "config.yaml"]).item_embedding_size == 16


@pytest.mark.parametrize(
    "flag, value",
    [("n_layers", "3"), ("train_batch_size", "4"), ("optim_args.learning_rate", "0.5"), ("seed", "1")],
)
def test_resume_refuses_flags_that_change_the_run(tiny_dataset, tmp_path, capsys, flag, value):
    _train(tiny_overrides(tiny_dataset, tmp_path, epochs=1, popularity_baseline="false"))
    run = tmp_path / "run"
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", f"--{flag}", value]) == 2
    err = capsys.readouterr().err
    assert f"--{flag}" in err and "resumed run" in err and len(err.strip().splitlines()) == 1
    assert (run / "config.yaml").read_text() == before


def test_resuming_a_finished_run_says_so(tiny_dataset, tmp_path, capsys):
    _train(tiny_overrides(tiny_dataset, tmp_path, epochs=1, popularity_baseline="false"))
    run = tmp_path / "run"
    results = (run / "results.json").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (run / "results.json").read_text() == results


# ---- killed runs: one process, signals, two processes ------------------------------------------------------
COMMON = dict(
    epochs=40, max_steps=60, save_every_steps=1, hidden_dropout_prob=0.3, popularity_baseline="false"
)


def _cli(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "persrec.cli", "train", *args], env=env, **popen)


def _wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        found = ckpt.latest_checkpoint(run) if (run / "checkpoints").is_dir() else None
        if found is not None and ckpt.load_trainer_state(found).global_step >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step} (exit code {process.poll()})")


def _kill_after_step(run: Path, step: int, process: subprocess.Popen, before: int) -> None:
    """SIGKILL a run (launcher and every worker) once it has checkpointed `step`, and check that it stopped
    before step `before` and that nothing writes another checkpoint afterwards."""
    _wait_for_step(run, step, process, timeout=300)
    kill_process_tree(process.pid)
    process.wait()
    stopped = ckpt.load_trainer_state(ckpt.latest_checkpoint(run)).global_step
    assert stopped < before
    time.sleep(1.0)
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(run)).global_step == stopped


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    assert _cli(cli_flags(tiny_overrides(tiny_dataset, root, **COMMON))).wait(timeout=300) == 0
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_with_a_checkpoint_and_the_resume_command(
    tiny_dataset, tmp_path, reference_run, stop_signal, exit_code
):
    overrides = tiny_overrides(tiny_dataset, tmp_path, **COMMON)
    run = tmp_path / "run"
    process = _cli(cli_flags(overrides), stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, 20, process)
    process.send_signal(stop_signal)
    _, err = process.communicate(timeout=120)
    assert process.returncode == exit_code, err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("persrec:")]
    assert f"resume with: persrec train --resume {run}" in line
    stopped = ckpt.load_trainer_state(ckpt.latest_checkpoint(run)).global_step
    assert stopped < 60
    # best/ is usable right away: its config and id map are written with the weights
    assert (run / "best" / "config.yaml").is_file()
    assert main(["evaluate", str(run), "--show_progress", "false", "--popularity_baseline", "false"]) == 0
    # the printed command, as printed, finishes the run exactly as if it had never stopped
    command = line.split("resume with: ")[1].split()
    assert command[:2] == ["persrec", "train"]
    assert _cli(command[2:]).wait(timeout=300) == 0
    _assert_same_weights(_weights(reference_run), _weights(run))
    assert _metrics_rows(run) == _metrics_rows(reference_run)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_for_bit_with_identical_logs(tiny_dataset, tmp_path, reference_run):
    overrides = tiny_overrides(tiny_dataset, tmp_path, **COMMON)
    run = tmp_path / "run"
    for stop_at in (13, 31):  # killed twice, the second time after a resume
        process = _cli(cli_flags({**overrides, "resume": "true"} if stop_at > 13 else overrides))
        _wait_for_step(run, stop_at, process)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert _cli(cli_flags({**overrides, "resume": "true"})).wait(timeout=300) == 0
    _assert_same_weights(_weights(reference_run), _weights(run))
    assert _metrics_rows(run) == _metrics_rows(reference_run)
    ours, theirs = (json.loads((r / "results.json").read_text()) for r in (run, reference_run))
    assert ours["test"] == theirs["test"] and ours["global_step"] == theirs["global_step"] == 60


def _torchrun(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = torchrun_command(2)
    return subprocess.Popen(
        [*command, "-m", "persrec.cli", "train", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_two_process_kill_and_resume_is_bit_for_bit(tiny_dataset, tmp_path):
    common = {**COMMON, "max_steps": 24, "hidden_dropout_prob": 0.3}
    reference = tiny_overrides(tiny_dataset, tmp_path / "reference", **common)
    process = _torchrun(cli_flags(reference))
    assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]

    interrupted = tiny_overrides(tiny_dataset, tmp_path / "interrupted", **common)
    run = tmp_path / "interrupted" / "run"
    process = _torchrun(cli_flags(interrupted))
    _kill_after_step(run, 7, process, before=24)
    assert len(json.loads((ckpt.latest_checkpoint(run) / "rng.json").read_text())["ranks"]) == 2
    process = _torchrun(cli_flags({**interrupted, "resume": "true"}))
    assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
    _assert_same_weights(_weights(tmp_path / "reference" / "run"), _weights(run))
    assert _metrics_rows(run) == _metrics_rows(tmp_path / "reference" / "run")


# ---- the dataset travels with the weights --------------------------------------------------------------
def test_relative_dataset_paths_are_stored_resolved(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_dataset.parent)
    _train(tiny_overrides(Path(tiny_dataset.name), tmp_path, epochs=1, popularity_baseline="false"))
    for saved in (tmp_path / "run" / "config.yaml", tmp_path / "run" / "best" / "config.yaml"):
        assert load_config([saved]).dataset == str(tiny_dataset.resolve())


def test_evaluate_refuses_another_dataset_unless_told(tiny_dataset, tmp_path, capsys):
    from persrec.data.datasets.synthetic import generate_synthetic
    from persrec.data.prepare import PrepareOptions, prepare_dataset
    from tests.conftest import TINY

    _train(tiny_overrides(tiny_dataset, tmp_path, epochs=1, popularity_baseline="false"))
    run = tmp_path / "run"
    capsys.readouterr()
    # other interactions (and another item count): refused, naming what differs
    built = generate_synthetic(dataclasses.replace(TINY, seed=11), tmp_path / "raw-other")
    prepare_dataset(built.interactions, tmp_path / "other", items=built.items, progress=False)
    assert main(["evaluate", str(run), "--dataset", str(tmp_path / "other")]) == 2
    assert "num_interactions" in capsys.readouterr().err
    # the same interactions prepared with other options: same shapes, so only the fingerprint tells
    built = generate_synthetic(TINY, tmp_path / "raw-same")
    options = PrepareOptions(drop_duplicates=True)
    prepare_dataset(built.interactions, tmp_path / "same", items=built.items, options=options, progress=False)
    assert main(["evaluate", str(run), "--dataset", str(tmp_path / "same")]) == 2
    assert "manifest_sha256" in capsys.readouterr().err
    flags = [
        "--dataset",
        str(tmp_path / "same"),
        "--allow_dataset_mismatch",
        "true",
        "--show_progress",
        "false",
    ]
    assert main(["evaluate", str(run), *flags]) == 0

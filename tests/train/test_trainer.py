"""End-to-end training on a tiny dataset: results, checkpoints, evaluation and exact resume."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persrec.cli import main
from persrec.config import ConfigError, load_config
from persrec.train.distributed import DistributedContext
from persrec.train.trainer import Trainer
from tests.conftest import tiny_overrides, torchrun_command


def _train(overrides: dict) -> tuple[Trainer, object]:
    trainer = Trainer(load_config(overrides=overrides), DistributedContext())
    return trainer, trainer.fit()


@pytest.mark.parametrize("model", ["HSTU", "SASRec"])
def test_training_writes_results_checkpoints_and_learns(tiny_dataset, tmp_path, model):
    trainer, result = _train(tiny_overrides(tiny_dataset, tmp_path, model=model, epochs=3))
    run = tmp_path / "run"
    summary = json.loads((run / "results.json").read_text())
    assert set(summary) >= {"valid", "test", "best_epoch", "filter_seen"}
    for split in ("valid", "test"):
        assert 0 <= summary[split]["recall@5"] <= summary[split]["recall@10"] <= 1
        assert summary[split]["count"] == 48
    assert (run / "best" / "model.safetensors").is_file() and (run / "best" / "config.yaml").is_file()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    for name in ("model.safetensors", "optimizer.pt", "rng.json", "trainer_state.json", "config.yaml"):
        assert (run / "checkpoints" / latest / name).is_file()
    for name in ("dataset.json", "item_ids.parquet"):  # best/ is usable without the prepared dataset
        assert (run / "best" / name).is_file()
    assert summary["dataset"]["num_items"] == trainer.store.num_items
    assert summary["config"]["model"] == model and summary["versions"]["torch"] == torch.__version__
    assert summary["parameters"] == sum(p.numel() for p in trainer.model.parameters())
    assert isinstance(summary["test"]["count"], int) and summary["wall_seconds"] > 0
    losses = [row["loss"] for row in trainer.state.history]
    assert losses[-1] < losses[0]
    assert (run / "metrics.csv").read_text().startswith("step,")


def test_without_validation_split_epochs_are_selected_on_the_test_item(tiny_dataset, tmp_path, capsys):
    overrides = tiny_overrides(tiny_dataset, tmp_path, epochs=2, validation_split=False)
    trainer, result = _train(overrides)
    assert result.valid == result.test  # the selection metric is the test metric
    assert trainer.train_set.held_out == 1
    assert "selected on the test items" in capsys.readouterr().err


def test_expert_model_trains_and_evaluates_through_the_cache(tiny_dataset, tmp_path):
    overrides = tiny_overrides(
        tiny_dataset,
        tmp_path,
        model="PersonalizedHSTU",
        number_of_user_tokens=2,
        pretrain_item_num=10,
        recent_item_num=6,
        insert_method="0",
    )
    trainer, result = _train(overrides)
    assert trainer.model.options.use_cache
    full = trainer.model.options
    full.use_cache = False
    assert trainer.evaluate("test") == pytest.approx(result.test, abs=1e-6)


def test_evaluate_command_reproduces_the_test_metrics(tiny_dataset, tmp_path, capsys):
    _, result = _train(tiny_overrides(tiny_dataset, tmp_path))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--show_progress", "false"]) == 0
    printed = capsys.readouterr().out
    assert f"{result.test['recall@10']:.4f}" in printed and "filter_seen=False" in printed
    assert main(["evaluate", str(tmp_path / "run"), "--val_only", "--filter_seen", "true"]) == 0
    printed = capsys.readouterr().out
    assert "| valid" in printed and "| test" not in printed and "filter_seen=True" in printed


def test_bad_config_values_are_reported(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="valid_metric"):
        _train(tiny_overrides(tiny_dataset, tmp_path, valid_metric="ndcg@7"))
    with pytest.raises(ConfigError, match="number_of_user_tokens"):
        _train(tiny_overrides(tiny_dataset, tmp_path, model="PersonalizedSASRec"))
    assert main(["train", "--dataset", str(tiny_dataset), "--epochz", "1"]) == 2


WORKER = """
import sys
from safetensors.torch import save_file
from persrec.config import load_config
from persrec.train.distributed import setup_distributed, teardown_distributed
from persrec.train.trainer import Trainer
import json
ctx = setup_distributed("cpu")
overrides = json.loads(sys.argv[1])
trainer = Trainer(load_config(overrides=overrides), ctx)
trainer.train_epoch()
state = {k: v.contiguous() for k, v in trainer.model.state_dict().items()}
save_file(state, sys.argv[2] + f"/rank{ctx.rank}.safetensors")
metrics = trainer.evaluate("valid")
open(sys.argv[2] + f"/metrics{ctx.rank}.json", "w").write(json.dumps(metrics))
teardown_distributed()
"""


@pytest.mark.slow
def test_two_processes_hold_identical_weights_after_a_step(tiny_dataset, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    overrides = tiny_overrides(tiny_dataset, tmp_path, max_steps=1)
    command = [
        *torchrun_command(2),
        str(script),
        json.dumps(overrides),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    initial = Trainer(load_config(overrides=overrides), DistributedContext()).model.state_dict()
    changed = [name for name in rank0 if not torch.equal(rank0[name], initial[name])]
    assert changed, "the step did not update any weight"
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # each rank evaluated half of the users; the reduced metrics are identical and cover everyone
    m0, m1 = (json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1))
    assert m0 == m1 and m0["count"] == 48


def test_evaluate_compares_cache_and_studies_staleness(tiny_dataset, tmp_path, capsys):
    overrides = tiny_overrides(
        tiny_dataset,
        tmp_path,
        model="PersonalizedSASRec",
        number_of_user_tokens=2,
        pretrain_item_num=10,
        recent_item_num=6,
    )
    _train(overrides)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--compare_cache", "true", "--stale_experts", "0,4"]) == 0
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| test") or line.startswith("| valid")
    }
    assert rows["test (expert cache)"] == rows["test (full masked pass)"]
    assert rows["test (experts 0 interactions stale)"] == rows["test (expert cache)"]
    assert "test (experts 4 interactions stale)" in rows


def test_a_new_run_never_overwrites_an_existing_one(tiny_dataset, tmp_path):
    overrides = tiny_overrides(tiny_dataset, tmp_path, epochs=1, popularity_baseline="false")
    _train(overrides)
    with pytest.raises(ConfigError, match="--resume true"):
        _train(overrides)

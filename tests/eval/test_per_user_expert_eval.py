"""Models with per-user expert tokens: evaluation batches carry the users, and `persrec evaluate` rebuilds the
per-user table and reproduces the run's own end-of-training metrics."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from persrec.cli import main
from persrec.config import load_config
from persrec.data.sequences import WindowConfig
from persrec.data.store import PreparedDataset
from persrec.eval.ranking import EvalConfig
from persrec.eval.runner import eval_loader, evaluate_model
from persrec.train.build import build_model
from persrec.train.distributed import DistributedContext
from tests.conftest import tiny_overrides

EXPERTS = dict(
    model="PersonalizedHSTU",
    number_of_user_tokens=2,
    pretrain_item_num=10,
    recent_item_num=6,
    insert_method="0",
    per_user_expert_tokens=True,
)


def _flags(overrides: dict) -> list[str]:
    flags = []
    for key, value in overrides.items():
        flags += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def _rows(printed: str) -> dict[str, dict[str, str]]:
    """The printed metrics table as {result: {column: cell}}."""
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return rows


def test_evaluate_reproduces_a_per_user_expert_runs_metrics(tiny_dataset, tmp_path, capsys):
    # a high learning rate so that the per-user offsets move away from their zero init
    overrides = tiny_overrides(tiny_dataset, tmp_path, **EXPERTS, **{"optim_args.learning_rate": 0.02})
    assert main(["train", *_flags(overrides)]) == 0
    run = tmp_path / "run"
    per_user = load_file(run / "best" / "model.safetensors")["model.experts.per_user.weight"]
    assert per_user.shape[0] == PreparedDataset.open(tiny_dataset).num_users and per_user.abs().max() > 1e-3
    summary = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    rows = _rows(capsys.readouterr().out)
    for split in ("valid", "test"):
        expected = {column: f"{summary[split][column]:.4f}" for column in rows[split] if column != "users"}
        assert {column: cell for column, cell in rows[split].items() if column != "users"} == expected
        assert rows[split]["users"] == str(int(summary[split]["count"]))


def test_evaluation_batches_reach_the_per_user_tokens(tiny_dataset, tmp_path):
    config = load_config(overrides=tiny_overrides(tiny_dataset, tmp_path, **EXPERTS))
    store = PreparedDataset.open(tiny_dataset)
    torch.manual_seed(0)
    model = build_model(config, store.num_items, store.num_users).eval()
    with torch.no_grad():
        model.model.experts.per_user.weight.normal_()
    loader = eval_loader(store, "test", WindowConfig(max_length=16), 16, DistributedContext(), False)
    eval_config = EvalConfig(ks=(5, 10))
    with_users = evaluate_model(model, loader, eval_config, torch.device("cpu"))
    # without the per-user table every user gets the shared tokens, as batches without user ids would
    model.model.experts.per_user = None
    shared_only = evaluate_model(model, loader, eval_config, torch.device("cpu"))
    assert with_users["count"] == shared_only["count"] == 48
    assert with_users["mrr"] != shared_only["mrr"]
    batch = next(iter(loader))
    assert torch.equal(batch["user"], torch.as_tensor(loader.dataset.users[: len(batch["user"])]))

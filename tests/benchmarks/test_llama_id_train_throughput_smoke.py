"""The LLaMA-ID training-throughput benchmark on tiny models: every path and field, FLOPs by hand, and
checkpointing changes the cost of a step but not its result.

No timing thresholds: times on a shared machine say nothing about correctness.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import llama_id_train_throughput as bench
from benchmarks import train_throughput

TINY = ["--window", "20", "--history", "16", "--tokens", "2", "--batch", "2", "--layers", "1", "--dim", "16"]
TINY += ["--heads", "2", "--items", "50", "--negatives", "8", "--repeats", "2", "--budget-s", "0.01"]
PATHS = [
    "HSTU plain",
    "LLaMAID plain",
    "LLaMAID plain ckpt",
    "HSTU experts",
    "LLaMAID experts",
    "LLaMAID experts ckpt",
]


@pytest.fixture(autouse=True)
def _small_peak(monkeypatch):
    monkeypatch.setattr(train_throughput, "PEAK_SIZE", 256)  # reported, not checked: keep the test fast


def test_every_path_has_its_fields_and_a_ratio_to_hstu_of_the_same_layout():
    args = bench.parse_args(TINY)
    rows = bench.run(bench.path_specs(args, None), torch.device("cpu"), repeats=2, budget_s=0.01)
    assert [row["path"] for row in rows] == PATHS
    by_path = {row["path"]: row for row in rows}
    for row in rows:
        assert row["seq_per_s"] > 0 and row["seq_per_cpu_s"] > 0 and row["gflop"] > 0 and row["runs"] == 2
        assert row["experts"] == (2 if "experts" in row["path"] else 0)
        assert row["gradient_checkpointing"] == row["path"].endswith("ckpt")
        assert row["threads"] >= 1 and "load_1m_start" in row and "cpu_share" in row
        json.dumps(row)
        if row["model"] == "HSTU":
            assert row["vs_baseline_cpu"] is None
        else:
            base = by_path[row["baseline"]]
            assert row["baseline"] == "HSTU " + row["path"].split()[1]
            assert row["vs_baseline_cpu"] == row["seq_per_cpu_s"] / base["seq_per_cpu_s"]
            assert (row["architecture"], row["kv_heads"], row["intermediate"]) == ("llama", 2, 64)
    # checkpointing recomputes, it does not add matmuls to the count
    assert by_path["LLaMAID experts ckpt"]["gflop"] == by_path["LLaMAID experts"]["gflop"]
    assert bench.markdown(rows).count("\n") == len(rows) + 1


def test_llama_id_step_flops_match_a_hand_count():
    args = bench.parse_args(TINY)
    path = next(p for p in bench.path_specs(args, None) if p.name == "LLaMAID experts")
    model = bench.build_path(path, torch.device("cpu")).model
    pairs = train_throughput.allowed_pairs(path.shape)
    flops = train_throughput.step_flops(model, path.shape, pairs)
    linear = 4 * 2 * 16 * 16 + 3 * 2 * 16 * 64  # q, k, v, o (2 heads of 8, no grouping) + gated MLP of 64
    assert flops["linear"] == 3 * 2 * 22 * linear
    assert flops["attention"] == 3 * 2 * pairs * 2 * (16 + 16)
    assert flops["loss"] == 3 * 2 * 20 * (1 + 8) * 2 * 16


def _checkpointing(decoder) -> bool:
    """transformers 5.x calls it activation checkpointing, 4.x gradient checkpointing."""
    name = "is_activation_checkpointing" if hasattr(decoder, "activation_checkpointing_enable") else None
    return bool(getattr(decoder, name or "is_gradient_checkpointing"))


def test_checkpointing_gives_the_same_step():
    args = bench.parse_args(TINY)
    specs = {p.name: p for p in bench.path_specs(args, None)}
    plain = bench.build_path(specs["LLaMAID experts"], torch.device("cpu"))
    recomputed = bench.build_path(specs["LLaMAID experts ckpt"], torch.device("cpu"))
    assert _checkpointing(recomputed.model.backbone.decoder)
    assert not _checkpointing(plain.model.backbone.decoder)
    losses = []
    for trainee in (plain, recomputed):
        torch.manual_seed(0)
        losses.append(trainee.step())
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(plain.model.parameters(), recomputed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_smollm2_paths_build_from_a_config_only_directory(tmp_path):
    args = bench.parse_args([*TINY, "--smollm2"])
    paths = bench.path_specs(args, str(tmp_path))
    big = [p for p in paths if "SmolLM2" in p.name]
    assert [p.checkpointing for p in big] == [False, True]
    assert all(p.user_pretrain_dir == str(tmp_path) and p.baseline is None for p in big)
    assert all(p.config().user_pretrain_dir == str(tmp_path) for p in big)
    assert (big[0].shape.layers, big[0].shape.dim, big[0].shape.batch) == (30, 576, 2)


def test_command_line_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main([*TINY, "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["path"] for row in rows] == PATHS
    assert "| LLaMAID experts ckpt | 20 (+2) | 2 |" in capsys.readouterr().out

"""The serving benchmark's core on a tiny model: every field present, cached scores equal the full pass.

No timing thresholds: times on a shared machine say nothing about correctness.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import expert_serving as bench

FIELDS = {
    "backbone",
    "N",
    "P",
    "R",
    "k",
    "batch",
    "device",
    "threads",
    "full_ms",
    "cached_ms",
    "compress_ms",
    "one_item_ms",
    "speedup",
    "flop_ratio",
    "full_rps",
    "cached_rps",
    "roofline_full_ms",
    "roofline_cached_ms",
    "full_cpu_ms",
    "cached_cpu_ms",
    "speedup_cpu",
    "attention_full_work_ms",
    "attention_cached_work_ms",
    "max_abs_score_diff",
    "cpu_share",
    "load_1m_start",
    "load_1m_end",
}


def _tiny(backbone: str, batch: int = 2):
    return bench.RowSpec(backbone, history=40, batch=batch, layers=2, dim=16, heads=2, items=50)


@pytest.mark.parametrize("backbone", ["HSTU", "SASRec"])
def test_row_has_every_field_and_cached_scores_match(backbone):
    machine = bench.Machine(torch.device("cpu"), 1, 1e10, 1e10)
    row = bench.run_row(_tiny(backbone), machine, repeats=2, budget_s=0.01)
    assert not FIELDS - row.keys(), FIELDS - row.keys()
    assert (row["N"], row["P"], row["R"], row["k"], row["batch"]) == (40, 32, 8, 4, 2)
    assert row["max_abs_score_diff"] <= 1e-5
    assert row["flop_ratio"] > 1
    assert all(count >= 2 for count in row["runs"].values())
    assert row["attention_full_work_ms"] is not None and row["attention_cached_work_ms"] is not None
    if backbone == "SASRec":
        assert row["full_causal_max_abs_diff"] <= 1e-5
    else:
        assert row["full_causal_work_ms"] is None
    json.dumps(row)  # --json must be able to write it
    assert bench.markdown([row]).count("\n") == 2
    assert bench.analysis([row])[0].startswith(f"- {backbone}")


def test_flop_counts_match_a_hand_count():
    spec = _tiny("HSTU", batch=1)
    layout = bench.ExpertLayout(40, ((32, 4),))
    config = bench.BackboneConfig(num_items=50, max_positions=44, embedding_dim=16, num_layers=2, num_heads=2)
    counts = bench.flop_counts(bench.build_backbone(spec.backbone, config), layout, batch=1)
    linear = 2 * 16 * (2 * (2 * 8 + 2 * 8)) + 2 * 16 * 16  # uvqk + output, per token
    per_pair = 2 * (16 + 16)  # q·k and weights·v over 2 heads of width 8
    scoring = 2 * 16 * 51
    assert counts["full"] == 2 * (40 * linear + 40 * 41 // 2 * per_pair) + scoring
    # 8 recent queries see the 4 experts and the causal recent window
    assert counts["cached"] == 2 * (8 * linear + (8 * 4 + 8 * 9 // 2) * per_pair) + scoring
    # history items: causal over 32; experts: the 32 items and the earlier experts of their group
    assert counts["compress"] == 2 * (36 * linear + (32 * 33 // 2 + 4 * 32 + 4 * 5 // 2) * per_pair)


def test_command_line_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = ["--backbones", "HSTU", "--lengths", "40", "--batches", "1", "--layers", "1", "--dim", "16"]
    args += ["--heads", "2", "--items", "50", "--repeats", "2", "--budget-s", "0.01", "--json", str(out)]
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["backbone"] == "HSTU" and rows[0]["N"] == 40
    assert "| HSTU | 40 (32+8, 4) | 1 |" in capsys.readouterr().out


def _tiny_llama(batch: int = 2):
    return bench.RowSpec(
        "LLaMAID", history=40, batch=batch, layers=2, dim=24, heads=3, kv_heads=1, intermediate=40, items=50
    )


def test_llama_id_row_has_every_field_and_cached_scores_match():
    machine = bench.Machine(torch.device("cpu"), 1, 1e10, 1e10)
    row = bench.run_row(_tiny_llama(), machine, repeats=2, budget_s=0.01)
    assert not FIELDS - row.keys(), FIELDS - row.keys()
    assert (row["N"], row["P"], row["R"], row["k"], row["batch"]) == (40, 32, 8, 4, 2)
    assert (row["architecture"], row["kv_heads"], row["intermediate"]) == ("llama", 1, 40)
    assert row["max_abs_score_diff"] <= 1e-4 and row["max_abs_score"] > 0
    assert row["flop_ratio"] > 1
    # transformers' sdpa kernel is found and replayed for both request paths
    assert row["attention_full_work_ms"] is not None and row["attention_cached_work_ms"] is not None
    # the unmasked decoder (SDPA's causal kernel) gives the same scores as the explicit-mask full path
    assert row["full_causal_max_abs_diff"] <= 1e-5 and row["full_causal_work_ms"] is not None
    json.dumps(row)
    assert bench.markdown([row]).count("\n") == 2
    assert bench.analysis([row])[0].startswith("- LLaMAID")


def test_llama_id_flops_match_the_blocks_linear_layers_and_a_hand_count():
    spec = _tiny_llama(batch=1)
    config = bench.BackboneConfig(num_items=50, max_positions=44, embedding_dim=24, num_layers=2, num_heads=3)
    backbone = bench.build_row_backbone(spec, config)
    block = backbone.shardable_layers()[0]
    modules = sum(
        2 * m.in_features * m.out_features for m in block.modules() if isinstance(m, torch.nn.Linear)
    )
    # q and o over 3 heads of width 8, k and v over 1 key/value head, gate/up/down of the 40-wide MLP
    linear = 2 * 24 * 24 + 2 * 2 * 24 * 8 + 2 * 24 * 24 + 3 * 2 * 24 * 40
    assert modules == linear
    per_pair = 2 * (24 + 24)  # every query head still scores every allowed key
    scoring = 2 * 24 * 51
    counts = bench.flop_counts(backbone, bench.ExpertLayout(40, ((32, 4),)), batch=1)
    assert counts["full"] == 2 * (40 * linear + 40 * 41 // 2 * per_pair) + scoring
    assert counts["cached"] == 2 * (8 * linear + (8 * 4 + 8 * 9 // 2) * per_pair) + scoring


def test_llama_id_defaults_to_the_smollm2_shape_and_leaves_native_defaults_alone():
    args = bench.parse_args(["--backbones", "LLaMAID", "HSTU"])
    assert bench.backbone_shape(args, "LLaMAID") == bench.SMOLLM2_135M_SHAPE
    assert bench.backbone_shape(args, "HSTU") == bench.NATIVE_SHAPE
    assert bench.parse_args([]).backbones == ["HSTU", "SASRec"]
    shape = bench.backbone_shape(args, "LLaMAID")
    llama = bench.llama_config(bench.RowSpec("LLaMAID", 1280, 1, **shape), max_positions=1284)
    assert (llama.num_hidden_layers, llama.hidden_size, llama.num_attention_heads) == (30, 576, 9)
    assert (llama.num_key_value_heads, llama.intermediate_size, llama.rms_norm_eps) == (3, 1536, 1e-5)
    rope = getattr(llama, "rope_parameters", None) or {"rope_theta": llama.rope_theta}
    assert rope["rope_theta"] == 100_000.0


def test_llama_id_command_line_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = ["--backbones", "LLaMAID", "--lengths", "40", "--batches", "1", "--layers", "1", "--dim", "16"]
    args += ["--heads", "2", "--kv-heads", "1", "--intermediate", "32", "--items", "50", "--repeats", "2"]
    assert bench.main([*args, "--budget-s", "0.01", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["backbone"] == "LLaMAID" and rows[0]["kv_heads"] == 1
    text = capsys.readouterr().out
    assert "LLaMAID (Llama): 1 layers, d=16, 2 heads, 1 key/value heads, MLP 32" in text
    assert "| LLaMAID | 40 (32+8, 4) | 1 |" in text

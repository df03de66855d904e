"""The reference comparison's own logic, on tiny shapes: FBGEMM stand-ins, interleaving, ratios, the table.

The part that needs a checkout of generative-recommenders (building its HSTU, mapping the weights, checking
the outputs agree) runs when GENERATIVE_RECOMMENDERS_PATH names one and is skipped otherwise. No timing
thresholds: times on a shared machine say nothing about correctness.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import hstu_reference_compare as bench

REFERENCE = os.environ.get("GENERATIVE_RECOMMENDERS_PATH")
needs_reference = pytest.mark.skipif(
    not REFERENCE or not (Path(REFERENCE) / "generative_recommenders").is_dir(),
    reason="set GENERATIVE_RECOMMENDERS_PATH to a checkout of meta-recsys/generative-recommenders",
)
TINY = bench.Setting("tiny", layers=2, heads=2, head_dim=4, length=12, batch=3, items=40)


def test_fbgemm_stand_ins_match_a_loop_on_ragged_batches():
    lengths = torch.tensor([3, 0, 5])
    offsets = bench.complete_cumsum(lengths)
    assert offsets.tolist() == [0, 3, 3, 8]
    values = torch.arange(16.0).view(8, 2)
    dense = bench.jagged_to_padded_dense(values, [offsets], [4], padding_value=-1.0)
    expected = torch.full((3, 4, 2), -1.0)
    expected[0, :3] = values[0:3]
    expected[2, :4] = values[3:7]  # the fifth item of a 5-long sequence is cut at N = 4
    assert torch.equal(dense, expected)
    back, same_offsets = bench.dense_to_jagged(dense, [bench.complete_cumsum(lengths.clamp(max=4))])
    assert torch.equal(back, torch.cat([values[0:3], values[3:7]]))
    assert same_offsets[0].tolist() == [0, 3, 3, 7]


def test_full_length_batches_become_views():
    values = torch.randn(6, 3, requires_grad=True)
    offsets = bench.complete_cumsum(torch.tensor([3, 3]))
    dense = bench.jagged_to_padded_dense(values, [offsets], [3])
    assert dense.data_ptr() == values.data_ptr() and dense.shape == (2, 3, 3)
    jagged, _ = bench.dense_to_jagged(dense, [offsets])
    assert jagged.data_ptr() == values.data_ptr()
    jagged.sum().backward()  # gradients flow through the stand-ins
    assert torch.equal(values.grad, torch.ones(6, 3))


def test_interleaving_flips_the_order_every_round():
    calls: list[str] = []
    paths = {"reference": lambda: calls.append("r"), "persrec": lambda: calls.append("p")}
    samples = bench.time_interleaved(paths, rounds=4, device=torch.device("cpu"))
    assert "".join(calls) == "rp" + "rp" + "pr" + "rp" + "pr"  # warm-ups, then alternating rounds
    assert {name: len(values) for name, values in samples.items()} == {"reference": 4, "persrec": 4}


def test_ratios_are_reference_over_persrec_medians():
    samples = {
        "reference": [(0.3, 0.6), (0.1, 0.2), (0.2, 0.4)],
        "persrec": [(0.1, 0.1), (0.05, 0.05), (0.5, 0.5)],
    }
    result = bench.ratios(samples)
    assert result["reference_ms"] == pytest.approx(200.0) and result["persrec_ms"] == pytest.approx(100.0)
    assert result["ratio"] == pytest.approx(2.0) and result["ratio_cpu"] == pytest.approx(4.0)


def test_the_three_settings_and_their_quick_versions():
    full, quick = bench.settings(False), bench.settings(True, relative_bias=False)
    shapes = [(s.layers, s.heads, s.head_dim, s.dim, s.length, s.batch) for s in full]
    assert shapes == [(2, 1, 50, 50, 200, 128), (8, 2, 25, 50, 200, 128), (16, 8, 8, 64, 1024, 4)]
    assert all(s.relative_bias for s in full) and not any(s.relative_bias for s in quick)
    assert [s.batch for s in quick] == [32, 32, 2]
    assert [s.length for s in quick] == [s.length for s in full]


def test_persrec_side_trains_its_relative_bias_on_the_benchmark_batch():
    model = bench.build_persrec(TINY)
    batch = bench.make_batch(TINY)
    assert bool((batch.timestamps.diff(dim=1) >= 0).all()) and bool((batch.ids > 0).all())
    weight = torch.randn(TINY.batch, TINY.length, TINY.dim)
    bench.train_step(lambda: bench.persrec_forward(model, batch), model, weight)()
    table = model.layers[0].relative_bias
    assert table.position_bias.grad.abs().sum() > 0 and table.time_bias.grad.abs().sum() > 0
    bench.inference_step(lambda: bench.persrec_forward(model, batch), model)()
    out = bench.persrec_forward(model, batch)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(TINY.batch, TINY.length))


def test_markdown_has_a_row_per_setting():
    mode = {"reference_ms": 30.0, "persrec_ms": 10.0, "ratio": 3.0, "ratio_cpu": 2.5}
    row = {
        "setting": "tiny",
        "relative_bias": True,
        "batch": 3,
        "train": mode,
        "inference": mode,
        "max_abs_diff": 0.0,
    }
    table = bench.markdown([row, {**row, "relative_bias": False}])
    assert table.count("\n") == 3
    assert "| tiny | on | 3 | 30.0 | 10.0 | 3.00x (2.50x) |" in table and "| tiny | off |" in table


def test_a_missing_checkout_says_how_to_get_one(tmp_path, capsys):
    with pytest.raises(SystemExit, match="git clone https://github.com/meta-recsys/generative-recommenders"):
        bench.main(["--reference", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    assert "git clone" in capsys.readouterr().out


@needs_reference
@pytest.mark.parametrize("relative_bias", [True, False])
def test_against_the_reference_outputs_agree_and_every_field_is_written(tmp_path, relative_bias):
    reference, operators = bench.load_reference(Path(REFERENCE))
    assert operators
    row = bench.run_setting(reference, replace(TINY, relative_bias=relative_bias), 2, torch.device("cpu"))
    assert row["max_abs_diff"] <= 1e-5
    for mode in ("train", "inference"):
        assert row[mode]["ratio"] > 0 and len(row[f"{mode}_samples_ms"]["persrec"]) == 2
    json.dumps(row)

"""LLaMA-ID through the real entry point: train, then evaluate both serving paths from the model directory."""

import json
import shutil

import pytest

pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

from persrec.cli import main  # noqa: E402
from persrec.hf.tiny import decoder_config  # noqa: E402
from tests.conftest import cli_flags, tiny_overrides  # noqa: E402

EXPERTS = {"number_of_user_tokens": 2, "pretrain_item_num": 8, "recent_item_num": 8}


def metric_rows(out: str) -> dict[str, str]:
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "result" not in line]
    return {cells[1].strip(): "|".join(cells[2:]) for cells in rows}


def test_llama_id_from_a_config_directory_trains_and_serves_from_its_cache(tiny_dataset, tmp_path, capsys):
    # A directory holding only config.json builds that architecture (here GPT-2) with random weights.
    user_model = tmp_path / "gpt2"
    decoder_config("gpt2", hidden_size=16, num_layers=1, num_heads=2, max_positions=32).save_pretrained(
        user_model
    )
    overrides = tiny_overrides(tiny_dataset, tmp_path, epochs=1, model="llama_id", **EXPERTS)
    overrides["user_pretrain_dir"] = str(user_model)
    assert main(["train", *cli_flags(overrides)]) == 0
    out = capsys.readouterr().out
    assert "test" in metric_rows(out)
    best = next(tmp_path.glob("*/best"))
    saved = json.loads((best / "user_model_config.json").read_text())
    assert saved["model_type"] == "gpt2" and saved["n_embd"] == 16
    # The model directory stands on its own: the original user model directory is not needed any more.
    shutil.rmtree(user_model)
    assert main(["evaluate", str(best), "--compare_cache", "true", "--show_progress", "false"]) == 0
    rows = metric_rows(capsys.readouterr().out)
    for split in ("valid", "test"):
        assert rows[f"{split} (expert cache)"] == rows[f"{split} (full masked pass)"]

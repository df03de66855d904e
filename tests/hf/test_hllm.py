"""HLLM end to end on tiny models: item LLM over item text, user LLM with experts, frozen and trainable."""

import shutil

import pytest
import torch

from persrec.cli import main
from persrec.config import Config, ConfigError
from persrec.data.store import PreparedDataset
from persrec.models.hllm import HLLMBackbone
from persrec.train.build import build_model
from tests.conftest import cli_flags, tiny_overrides
from tests.hf.test_llama_id_cli import EXPERTS, metric_rows
from tests.hf.tiny_models import tiny_bert_dir, tiny_llama_dir


def hllm_overrides(tiny_dataset, tmp_path, item_dir, **extra):
    overrides = tiny_overrides(tiny_dataset, tmp_path, epochs=1, model="PersonalizedHLLM", **EXPERTS)
    settings = {
        "item_pretrain_dir": str(item_dir),
        "text_keys": ["title", "cluster"],
        "MAX_TEXT_LENGTH": 12,
        "cache_dir": str(tmp_path / "cache"),
        "temperature": 0.07,
        "fix_temp": False,
    }
    return {**overrides, **settings, **extra}


def test_frozen_item_llm_trains_and_serves_without_the_item_model(tiny_dataset, tmp_path, capsys):
    item_dir = tiny_bert_dir(tmp_path / "bert")  # an encoder, mean pooled
    overrides = hllm_overrides(tiny_dataset, tmp_path, item_dir, item_emb_token_n=0)
    assert main(["train", *cli_flags(overrides)]) == 0
    out = capsys.readouterr().out
    assert "item embeddings of 59 items computed and saved to" in out
    assert "test" in metric_rows(out)
    # A second run reads the embeddings back instead of recomputing them.
    assert main(["train", *cli_flags({**overrides, "run_name": "again"})]) == 0
    assert "item embeddings of 59 items read from" in capsys.readouterr().out
    best = next(p for p in tmp_path.glob("*/best") if "again" not in str(p))
    assert (best / "item_model_config.json").is_file()
    shutil.rmtree(item_dir)  # the item table travels in the weights
    assert main(["evaluate", str(best), "--compare_cache", "true", "--show_progress", "false"]) == 0
    rows = metric_rows(capsys.readouterr().out)
    assert rows["test (expert cache)"] == rows["test (full masked pass)"]


def test_trainable_item_llm_gets_gradients_and_caches_item_vectors_for_evaluation(tiny_dataset, tmp_path):
    item_dir = tiny_llama_dir(tmp_path / "llama")
    config = Config(**hllm_overrides(tiny_dataset, tmp_path, item_dir, item_llm_trainable=True))
    store = PreparedDataset.open(tiny_dataset)
    model = build_model(config, store.num_items, dataset_dir=tiny_dataset)
    backbone = model.backbone
    assert isinstance(backbone, HLLMBackbone) and not backbone.frozen_items
    ids = torch.randint(1, store.num_items + 1, (2, 17))
    model.train()
    hidden, targets = model.training_outputs({"input_ids": ids[:, :-1], "target_ids": ids[:, 1:]})
    (hidden * model.embed_items(targets)).sum().backward()
    encoder = backbone.item_encoder
    assert encoder.item_tokens.grad.abs().sum() > 0
    assert encoder.llm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        table = model.item_embeddings()
        assert table.shape == (store.num_items + 1, backbone.dim)
        assert torch.allclose(table, backbone.item_projection(encoder.embed_all().float()), atol=1e-6)
        assert backbone.all_item_vectors() is backbone.all_item_vectors()  # computed once per evaluation
        # Expert cache and full masked pass agree for HLLM as for every backbone.
        batch = {"input_ids": ids[:, :16]}
        cached = model.user_embeddings(batch, use_cache=True)
        full = model.user_embeddings(batch, use_cache=False)
    assert (cached - full).abs().max() <= 1e-5
    model.train()
    assert backbone._evaluation_table is None


def test_items_without_text_are_named(tiny_dataset, tmp_path):
    item_dir = tiny_bert_dir(tmp_path / "bert")
    config = Config(**hllm_overrides(tiny_dataset, tmp_path, item_dir, text_keys=["no_such_column"]))
    store = PreparedDataset.open(tiny_dataset)
    with pytest.raises(ConfigError, match="no_such_column"):
        build_model(config, store.num_items, dataset_dir=tiny_dataset)


def test_untrained_item_tokens_on_a_frozen_item_model_are_pointed_out(tiny_dataset, tmp_path, capsys):
    item_dir = tiny_bert_dir(tmp_path / "bert")
    config = Config(**hllm_overrides(tiny_dataset, tmp_path, item_dir, item_emb_token_n=1))
    store = PreparedDataset.open(tiny_dataset)
    build_model(config, store.num_items, dataset_dir=tiny_dataset)
    assert "--item_emb_token_n 0 (mean pooling)" in capsys.readouterr().err

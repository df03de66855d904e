"""Config precedence, typing of command-line values, validation, the key reference and helpful errors."""

import dataclasses
import importlib.util
from importlib.resources import files

import pytest

from persrec.cli import config_from_argv
from persrec.config import (
    Config,
    ConfigError,
    OptimArgs,
    config_keys,
    load_config,
    parse_cli_overrides,
    suggest_key,
)
from persrec.config_reference import config_reference
from persrec.config_validation import measured_metrics


def test_defaults_then_files_in_order_then_command_line(tmp_path):
    first = tmp_path / "a.yaml"
    second = tmp_path / "b.yaml"
    first.write_text("epochs: 3\nn_layers: 4\noptim_args:\n  learning_rate: 0.01\n")
    second.write_text("epochs: 7\n")
    config = config_from_argv(
        ["--config_file", str(first), str(second), "--n_layers", "8", "--optim_args.weight_decay", "0.1"]
    )
    assert config.epochs == 7  # later file wins
    assert config.n_layers == 8  # command line wins over files
    assert config.optim_args.learning_rate == 0.01
    assert config.optim_args.weight_decay == 0.1
    assert config.train_batch_size == Config().train_batch_size


def test_authors_command_line_parses():
    argv = (
        "--loss nce --epochs 5 --dataset ml-1m --train_batch_size 64 --MAX_ITEM_LIST_LENGTH 200 "
        "--optim_args.learning_rate 1e-3 --fix_temp True --item_end_position 0 --topk 10,50"
    ).split()
    config = config_from_argv(argv)
    assert (config.loss, config.epochs, config.dataset) == ("nce", 5, "ml-1m")
    assert config.train_batch_size == 64 and config.MAX_ITEM_LIST_LENGTH == 200
    assert config.optim_args.learning_rate == pytest.approx(1e-3)
    assert config.fix_temp is True and config.item_end_position == 0 and config.topk == [10, 50]


def test_bare_flag_and_equals_form():
    assert parse_cli_overrides(["--val_only", "--epochs=3"]) == {"val_only": "true", "epochs": "3"}
    assert load_config(overrides={"val_only": "true"}).val_only is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epoch": 3}, "unknown option --epoch; did you mean --epochs\\?"),
        ({"learning_rate": 1}, "did you mean --optim_args.learning_rate\\?"),
        ({"optim_args.learning_rat": 1}, "did you mean --optim_args.learning_rate\\?"),
        ({"optim_args.epochs": 1}, "did you mean --epochs\\?"),
        ({"epochs.x": 1}, "unknown option --epochs.x; did you mean --epochs\\?"),
        ({"epochs": "many"}, "--epochs: expected int"),
        ({"topk": "a,b"}, "--topk: expected int, got 'a'"),
        ({"fix_temp": "maybe"}, "--fix_temp: expected true or false"),
        ({"optim_args": 3}, "--optim_args is a section"),
    ],
)
def test_mistakes_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("n_layer: 2\n")
    with pytest.raises(ConfigError, match=r"n_layer.*bad\.yaml.*n_layers"):
        load_config([path])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config([path])


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("epochs: 3\nn_layers: x: 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:2:12: invalid YAML: mapping values"):
        load_config([path])
    with pytest.raises(ConfigError, match="is a directory"):
        load_config([tmp_path])


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("max_item_list_length", "MAX_ITEM_LIST_LENGTH"),
        ("Epochs", "epochs"),
        ("learning_rate", "optim_args.learning_rate"),
        ("optim_args.learningrate", "optim_args.learning_rate"),
        ("OPTIM_ARGS.BETA1", "optim_args.beta1"),
        ("n_layer", "n_layers"),
        ("optim_args.seed", "seed"),
        ("zzzz", None),
    ],
)
def test_suggestions_are_valid_as_typed(typed, meant):
    assert suggest_key(typed) == meant
    assert meant is None or meant in config_keys()


def test_the_defaults_and_every_shipped_config_validate(tmp_path, monkeypatch):
    Config().validate()
    # The HLLM configs name their item model as `persrec models list` does; a stand-in directory answers to the
    # name where the model package is not installed.
    (tmp_path / "all-minilm-l6-v2").mkdir()
    (tmp_path / "all-minilm-l6-v2" / "config.json").write_text('{"model_type": "bert"}')
    monkeypatch.setenv("PERSREC_MODELS_DIR", str(tmp_path))
    configs = files("persrec") / "configs"
    for path in configs.iterdir():
        if not path.name.endswith(".yaml") or path.name.startswith("experts-"):
            continue
        config = load_config([str(path)])
        if config.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            with pytest.raises(ConfigError, match=r"pip install 'persrec\[deepspeed\]'"):
                config.validate()
            config = config.replace(strategy="ddp")  # everything else in it must still be valid
        config.validate()
    # The expert overlays go on top of a model config with their window.
    for model, overlay in [
        ("amazon-toy-hllm-minilm.yaml", "experts-P40-R10-k4.yaml"),
        ("ml1m-llama-id.yaml", "experts-P160-R40-k4.yaml"),
    ]:
        load_config([str(configs / model), str(configs / overlay)]).validate()


def test_measured_metrics_follow_topk():
    assert measured_metrics([10]) == ["recall@10", "ndcg@10", "mrr", "hr@10"]
    load_config(overrides={"topk": "10", "valid_metric": "hr@10"}).validate()
    with pytest.raises(ConfigError, match="--valid_metric.*add 50 to --topk"):
        load_config(overrides={"topk": "10", "valid_metric": "recall@50"}).validate()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optim_args.weight_decay": -1}, "--optim_args.weight_decay: expected a number >= 0, got -1.0"),
        ({"initializer_range": 0}, "--initializer_range"),
        ({"collision_cosine_threshold": 2}, "--collision_cosine_threshold"),
        ({"stale_experts": "-1"}, "--stale_experts"),
        ({"train_feat_max_length": 0}, "--train_feat_max_length: expected an integer >= 1"),
        ({"precision": "FP32"}, "did you mean 'fp32'"),
    ],
)
def test_values_out_of_range_name_the_flag(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides).validate()


def test_evaluation_validation_skips_training_only_keys():
    config = load_config(overrides={"topk": "5", "logger": "tensorboard"})
    config.validate(training=False)  # valid_metric ndcg@10 is not measured, but evaluate does not use it
    with pytest.raises(ConfigError, match="--valid_metric"):
        config.validate()


def test_every_key_is_documented_once_in_a_section():
    rows = config_reference()
    assert [row.key for row in rows] == config_keys()
    undocumented = [row.key for row in rows if not row.doc]
    assert not undocumented, f"add a comment above these fields in persrec/config.py: {undocumented}"
    sections = list(dict.fromkeys(row.section for row in rows))
    assert sections[:5] == [
        "data",
        "model",
        "Hugging Face backbones (LLaMAID, HLLM)",
        "personalized experts (PerSRec)",
        "loss",
    ]
    assert {"training", "optimiser (optim_args.*)", "evaluation"} <= set(sections)
    assert any("logging" in section for section in sections)
    by_key = {row.key: row for row in rows}
    assert by_key["optim_args.learning_rate"].default == OptimArgs().learning_rate
    assert by_key["topk"].type == "list of int" and by_key["run_name"].type == "str or none"
    # A comment documents the fields right below it with no line in between.
    assert by_key["hstu_v_dim"].doc == by_key["hstu_qk_dim"].doc
    assert len(rows) == sum(
        len(dataclasses.fields(OptimArgs)) if f.name == "optim_args" else 1
        for f in dataclasses.fields(Config)
    )

"""Config precedence, typing of command-line values, and helpful errors for mistakes."""

import pytest

from persrec.cli import config_from_argv
from persrec.config import Config, ConfigError, load_config, parse_cli_overrides


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
        ({"epoch": 3}, "did you mean 'epochs'"),
        ({"learning_rate": 1}, "did you mean 'optim_args.learning_rate'"),
        ({"optim_args.learning_rat": 1}, "did you mean 'learning_rate'"),
        ({"epochs": "many"}, "epochs: expected int"),
        ({"fix_temp": "maybe"}, "fix_temp: expected true or false"),
        ({"optim_args": 3}, "optim_args"),
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

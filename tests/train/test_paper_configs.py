"""The paper's EB-NeRD and MerRec window configs: their slices, and a training step on EB-NeRD-shaped data."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persrec.cli import main
from persrec.config import load_config
from persrec.data.datasets.registry import shared_data_dir
from persrec.data.sequences import WindowConfig

CONFIGS = files("persrec") / "configs"


def _config(name: str, **overrides: object):  # noqa: ANN202 - a Config
    return load_config([str(CONFIGS / name)], {k: str(v) for k, v in overrides.items()})


def _window(config) -> WindowConfig:  # noqa: ANN001
    return WindowConfig(
        max_length=config.MAX_ITEM_LIST_LENGTH,
        feature_max_length=config.train_feat_max_length,
        start_position=config.item_start_position,
        end_position=config.item_end_position,
    )


@pytest.mark.parametrize("name", ["ebnerd-personalized-hstu.yaml", "ebnerd-hstu.yaml"])
def test_ebnerd_window(name: str) -> None:
    config = _config(name)
    config.validate(training=False)
    history = np.arange(1, 3001)
    kept = _window(config).select(history, len(history))
    # 512 loaded, the most recent 500 inputs + the target
    assert config.train_feat_max_length == 512
    assert np.array_equal(kept[:-1], history[-501:-1]) and kept[-1] == history[-1]
    if name.startswith("ebnerd-personalized"):
        assert (config.pretrain_item_num, config.recent_item_num, config.number_of_user_tokens) == (
            400,
            100,
            4,
        )
        for k in (1, 2, 8):  # the documented sweep is one flag
            _config(name, number_of_user_tokens=k).validate(training=False)


@pytest.mark.parametrize("name", ["merrec-personalized-hstu.yaml", "merrec-hstu.yaml"])
def test_merrec_slice(name: str) -> None:
    config = _config(name)
    config.validate(training=False)
    history = np.arange(1, 5001)
    kept = _window(config).select(history, len(history))
    # 2000 loaded; the input is the slice -2000:-720 (1280 items), the next item its target.
    assert np.array_equal(kept[:-1], history[-2000:-720]) and kept[-1] == history[-720]
    if name.startswith("merrec-personalized"):
        assert (config.pretrain_item_num, config.recent_item_num, config.number_of_user_tokens) == (
            1024,
            256,
            4,
        )


FAST = [
    *("--max_steps", "1", "--epochs", "1", "--n_layers", "1", "--item_embedding_size", "16"),
    *("--hstu_qk_dim", "8", "--hstu_v_dim", "8", "--num_negatives", "8", "--train_batch_size", "4"),
    *("--eval_batch_size", "64", "--show_progress", "false", "--popularity_baseline", "false"),
    *("--attention_implementation", "reference", "--run_name", "run"),
]


def _history(path: Path, users: int = 6, clicks: int = 40) -> Path:
    rng = np.random.default_rng(0)
    ts = pa.large_list(pa.timestamp("s"))
    table = pa.table(
        {
            "user_id": pa.array(range(users), pa.uint32()),
            "article_id_fixed": pa.array(
                [rng.integers(1, 30, clicks).tolist() for _ in range(users)], pa.large_list(pa.int32())
            ),
            "impression_time_fixed": pa.array([[1_675_000_000 + 60 * j for j in range(clicks)]] * users, ts),
        }
    )
    path.mkdir(parents=True)
    pq.write_table(table, path / "history.parquet")
    return path


@pytest.mark.parametrize("name", ["ebnerd-personalized-hstu.yaml", "ebnerd-hstu.yaml"])
def test_ebnerd_config_trains_a_step(name: str, tmp_path: Path) -> None:
    raw = _history(tmp_path / "ebnerd")
    argv = ["train", "--config_file", str(CONFIGS / name), "--data_path", str(raw)]
    argv += ["--cache_dir", str(tmp_path / "cache"), "--checkpoint_dir", str(tmp_path / "runs"), *FAST]
    assert main(argv) == 0
    assert (tmp_path / "runs" / "run" / "best").is_dir()


@pytest.mark.shared_data
def test_ebnerd_config_on_the_official_fixture(tmp_path: Path) -> None:
    root = shared_data_dir()
    if root is None or not (root / "ebnerd-sample" / "history.parquet").is_file():
        pytest.skip("shared EB-NeRD fixture not available (set PERSREC_SHARED_DATA)")
    argv = ["train", "--config_file", str(CONFIGS / "ebnerd-personalized-hstu.yaml")]
    argv += [
        "--dataset",
        "ebnerd",
        "--data_path",
        str(root / "ebnerd-sample"),
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    assert main([*argv, "--checkpoint_dir", str(tmp_path / "runs"), *FAST]) == 0


@pytest.mark.slow
def test_merrec_config_trains_a_step(tmp_path: Path) -> None:
    """Only targets at least 720 events from the end of a 2000-load exist, so the users need long histories."""
    raw = tmp_path / "merrec" / "202305"
    raw.mkdir(parents=True)
    users, events = 4, 760
    rng = np.random.default_rng(2)
    table = pa.table(
        {
            "user_id": np.repeat(np.arange(users), events),
            "product_id": pa.array([f"p{i}" for i in rng.integers(0, 50, users * events)]),
            "event_id": pa.array(["item_view"] * (users * events)),
            "stime": np.tile(1_690_000_000 + 30 * np.arange(events), users),
            "name": pa.array(["listing"] * (users * events)),
        }
    )
    pq.write_table(table, raw / "part-0.parquet")
    for name in ("merrec-personalized-hstu.yaml", "merrec-hstu.yaml"):
        argv = ["train", "--config_file", str(CONFIGS / name), "--data_path", str(raw.parent)]
        argv += ["--cache_dir", str(tmp_path / "cache"), "--checkpoint_dir", str(tmp_path / name), *FAST]
        assert main(argv) == 0
        assert (tmp_path / name / "run" / "best").is_dir()

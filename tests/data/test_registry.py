"""Named datasets: lookup rules, helpful errors, and end-to-end build + prepare + cache."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from persrec.data.datasets import registry
from persrec.data.datasets.registry import (
    DATASETS,
    default_cache_dir,
    find_ml_1m,
    resolve_dataset,
    shared_data_dir,
    synthetic_cache_name,
)
from persrec.data.datasets.synthetic import SyntheticConfig


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep tests off the user's cache and environment."""
    monkeypatch.setenv("PERSREC_CACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.delenv("PERSREC_ML1M_DIR", raising=False)


def _write_tiny_ml_1m(root: Path) -> Path:
    """GroupLens layout that survives a 5/5 filter: 6 users x 6 movies, plus movie 9 rated only twice."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"{u}::{m}::{(u + m) % 5 + 1}::{1000 * u + 10 * m}" for u in range(1, 7) for m in range(1, 7)]
    lines += ["1::9::4::1999", "2::9::3::2999"]
    (root / "ratings.dat").write_bytes("\n".join(lines).encode("iso-8859-1") + b"\n")
    movies = [f"{m}::Movie {m} (199{m})::Drama" for m in range(1, 7)] + ["9::Café (1993)::Comedy"]
    (root / "movies.dat").write_bytes("\n".join(movies).encode("iso-8859-1") + b"\n")
    return root


# ------------------------------------------------------------------------------------------------ lookup


def test_known_names() -> None:
    builders = {"ebnerd", "eb_nerd_512", "merrec", "merrec_2000", "pixelrec", "amazon-reviews", "movielens"}
    assert set(DATASETS) == {"ml-latest-small", "ml-1m", "synthetic", *builders}


def test_cache_and_shared_dirs_follow_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERSREC_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("PERSREC_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv("PERSREC_SHARED_DATA", str(tmp_path / "absent"))
    assert shared_data_dir() is None


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(ValueError, match=r"ml-1m.*synthetic.*Did you mean 'ml-1m'\?"):
        resolve_dataset("ml1m")


def test_missing_path_and_unprepared_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        resolve_dataset(str(tmp_path / "nope" / "data"))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        resolve_dataset(tmp_path)


def test_find_ml_1m_accepts_parent_or_folder(tmp_path: Path) -> None:
    folder = _write_tiny_ml_1m(tmp_path / "movielens-1m")
    assert find_ml_1m(tmp_path) == folder
    assert find_ml_1m(folder) == folder


def test_ml_1m_not_found_says_what_to_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        resolve_dataset("ml-1m", data_path=tmp_path, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert str(tmp_path / "movielens-1m") in message
    assert "--data_path" in message and "PERSREC_ML1M_DIR" in message and "PERSREC_SHARED_DATA" in message

    monkeypatch.setenv("PERSREC_ML1M_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        find_ml_1m()


def test_synthetic_cache_name_depends_on_config() -> None:
    base = SyntheticConfig(num_users=10)
    assert synthetic_cache_name(base) == synthetic_cache_name(SyntheticConfig(num_users=10))
    assert synthetic_cache_name(base) != synthetic_cache_name(SyntheticConfig(num_users=10, seed=1))


# ------------------------------------------------------------------------------------------------ end to end


def test_embedded_ml_latest_small(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ds = resolve_dataset("ml-latest-small", cache_dir=cache, progress=False)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (610, 9_724, 100_836)
    assert ds.max_history == 2_698
    assert int(np.min(ds.lengths())) >= 20

    again = resolve_dataset(str(ds.path), progress=False)
    assert again.num_interactions == ds.num_interactions
    assert Path(ds.path) == cache / "ml-latest-small"


def test_ml_1m_from_raw_files_is_filtered_and_cached(tmp_path: Path) -> None:
    _write_tiny_ml_1m(tmp_path / "data" / "movielens-1m")
    cache = tmp_path / "cache"
    ds = resolve_dataset("ml-1m", data_path=tmp_path / "data", cache_dir=cache, progress=False)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (6, 6, 36)

    source = cache / "sources" / "ml-1m" / "interactions.parquet"
    built_at = source.stat().st_mtime_ns
    time.sleep(0.01)
    again = resolve_dataset("ml-1m", data_path=tmp_path / "data", cache_dir=cache, progress=False)
    assert again.num_interactions == 36
    assert source.stat().st_mtime_ns == built_at, "unchanged raw files must not be rebuilt"


def test_ml_1m_from_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERSREC_ML1M_DIR", str(_write_tiny_ml_1m(tmp_path / "ml")))
    ds = resolve_dataset("ml-1m", cache_dir=tmp_path / "cache", progress=False)
    assert ds.num_users == 6


def test_synthetic(tmp_path: Path) -> None:
    config = SyntheticConfig(num_users=40, num_items=200, num_interests=10, mean_history=50, seed=5)
    cache = tmp_path / "cache"
    ds = resolve_dataset("synthetic", synthetic=config, cache_dir=cache, progress=False)
    assert ds.num_users == 40
    assert ds.num_items <= 200
    assert Path(ds.path) == cache / synthetic_cache_name(config)
    assert resolve_dataset(
        "synthetic", synthetic=config, cache_dir=cache, progress=False
    ).num_interactions == (ds.num_interactions)


def test_default_cache_dir_is_used(tmp_path: Path) -> None:
    ds = resolve_dataset("synthetic", synthetic=SyntheticConfig(num_users=5, num_items=50), progress=False)
    assert Path(ds.path).parent == tmp_path / "default-cache"


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_ml_1m(tmp_path: Path) -> None:
    root = shared_data_dir() or registry.shared_data_candidates()[0]
    folder = root / registry.ML_1M_FOLDER
    if not folder.is_dir():
        pytest.skip(f"movielens-1m not found at {folder}; set PERSREC_SHARED_DATA")
    ds = resolve_dataset("ml-1m", data_path=root, cache_dir=tmp_path, progress=False)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (6_040, 3_416, 999_611)
    assert ds.max_history == 2_277

"""Dataset builders (raw public files to canonical parquet), the synthetic generator and named datasets."""

from persrec.data.datasets.movielens import BuiltDataset, build_ml_1m, build_ml_latest_small
from persrec.data.datasets.registry import (
    DATASETS,
    default_cache_dir,
    embedded_dataset_dir,
    resolve_dataset,
    shared_data_dir,
)
from persrec.data.datasets.synthetic import SyntheticConfig, generate_synthetic

__all__ = [
    "DATASETS",
    "BuiltDataset",
    "SyntheticConfig",
    "build_ml_1m",
    "build_ml_latest_small",
    "default_cache_dir",
    "embedded_dataset_dir",
    "generate_synthetic",
    "resolve_dataset",
    "shared_data_dir",
]

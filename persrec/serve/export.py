"""`persrec export`: item (and user) embeddings as parquet, optionally a FAISS index over the items.

Vectors are L2-normalised, so a user vector's dot product with an item vector is the model's score (the
cosine it ranks by). `items.parquet`: item_id (original), embedding (fixed-size list of float32).
`users.parquet`: user_id, embedding of the user's latest state. The FAISS index (`pip install
persrec[faiss]`) is an HNSW graph over the item vectors for catalogues too large for a dense matmul; its
recall@k against the exact top-k is measured when it is built and kept beside it (`items.faiss.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from persrec.atomic import atomic_path, atomic_write_json
from persrec.config import ConfigError

ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
INDEX_FILE = "items.faiss"
INDEX_META = "items.faiss.json"


def embedding_table(ids: list[Any], vectors: np.ndarray, id_name: str) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table({id_name: ids, "embedding": column})


def write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ConfigError("--index faiss needs FAISS: pip install 'persrec[faiss]'") from error
    return faiss


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ items.T
    top = np.argpartition(-scores, kth=min(k, items.shape[0] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact, strict=True)]
    return float(np.mean(hits) / exact.shape[1])


def build_faiss_index(
    items: np.ndarray, queries: np.ndarray, out_dir: Path, fingerprint: str, k: int = 10, neighbours: int = 32
) -> dict[str, Any]:
    """Write an inner-product HNSW index of `items` [N, D] and its measured recall@k on `queries`."""
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(items.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(np.ascontiguousarray(items, dtype=np.float32))
    index.hnsw.efSearch = 64
    k = min(k, items.shape[0])
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    meta = {
        "fingerprint": fingerprint,
        "items": int(items.shape[0]),
        "dim": int(items.shape[1]),
        "kind": f"HNSW{neighbours},IP (efSearch 64)",
        "recall_at_k": recall_at_k(found, exact_top_k(queries, items, k)),
        "k": k,
        "queries": int(queries.shape[0]),
    }
    with atomic_path(out_dir / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    atomic_write_json(out_dir / INDEX_META, meta)
    return meta


@dataclass
class FaissRetriever:
    """Top-k items of user vectors from an exported index (the index's rows are item_ids in export order)."""

    index: Any

    @classmethod
    def open(cls, path: Path, fingerprint: str) -> FaissRetriever:
        faiss = _faiss()
        path = Path(path)
        index_file = path / INDEX_FILE if path.is_dir() else path
        meta_file = index_file.with_name(INDEX_META)
        if not index_file.is_file() or not meta_file.is_file():
            raise ConfigError(
                f"--index {path}: expected {INDEX_FILE} and {INDEX_META} written by persrec export"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") != fingerprint:
            raise ConfigError(f"--index {path}: the index was built from another model; export it again")
        return cls(faiss.read_index(str(index_file)))

    def search(
        self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None
    ) -> list[tuple[list[int], list[float]]]:
        """Dense item ids (1-based, as the model's) and scores; excluded ids are searched past."""
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k + extra)
        out = []
        for row in range(len(queries)):
            banned = set(exclude[row].tolist()) if exclude else set()
            pairs = [
                (int(i) + 1, float(s))
                for i, s in zip(rows[row], scores[row], strict=True)
                if i >= 0 and int(i) + 1 not in banned
            ]
            out.append(([i for i, _ in pairs[:k]], [s for _, s in pairs[:k]]))
        return out

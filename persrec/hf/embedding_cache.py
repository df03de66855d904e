"""Item embeddings of a frozen item LLM, computed once and kept on disk (`--item_llm_trainable false`).

The file's name and its metadata carry a key made of everything that decides the embeddings: the model files
(config and tokenizer by content, weights by name, size and modification time), the text fingerprint (texts,
prompt, keys, truncation), the item-token count and values, the pooling and the dtype. A file whose key, shape or
values do not check out is recomputed and replaced, never trusted; writes are atomic, so a killed run leaves
either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from persrec.atomic import atomic_path
from persrec.data.fingerprint import sha256_file
from persrec.hf.item_encoder import ItemTextEncoder

CACHE_FORMAT = "persrec-item-embeddings-v1"
TENSOR_NAME = "item_embeddings"
CONTENT_HASH_LIMIT = 16 << 20
"""Files up to this size (configs, tokenizers) are identified by content; larger ones (weights) by name, size and
modification time, so a multi-GB checkpoint is not read on every start."""
SKIPPED_FILES = frozenset({"README.md", ".gitattributes"})


@dataclass(frozen=True)
class CachedEmbeddings:
    """`embeddings` [N + 1, H] (row 0 = padding zeros); `hit` says whether they came from `path`; `reason` why
    they were computed when not."""

    embeddings: torch.Tensor
    path: Path
    hit: bool
    reason: str


def model_files_identity(model_dir: Path) -> list[dict[str, Any]]:
    """One entry per file of the model directory (top level, sorted by name)."""
    entries = []
    for path in sorted(Path(model_dir).iterdir()):
        if not path.is_file() or path.name in SKIPPED_FILES:
            continue
        stat = path.stat()
        entry: dict[str, Any] = {"name": path.name, "size": stat.st_size}
        if stat.st_size <= CONTENT_HASH_LIMIT:
            entry["sha256"] = sha256_file(path)
        else:
            entry["mtime_ns"] = stat.st_mtime_ns
        entries.append(entry)
    return entries


def embedding_cache_key(encoder: ItemTextEncoder) -> dict[str, Any]:
    """Everything the cached embeddings depend on, as JSON-ready values."""
    key: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "model_files": model_files_identity(encoder.model_dir),
        "text_fingerprint": encoder.texts.fingerprint(encoder.options.max_text_length),
        "prompt": encoder.texts.prompt,
        "text_keys": list(encoder.texts.keys),
        **encoder.describe(),
    }
    if encoder.item_tokens is not None:
        tokens = encoder.item_tokens.detach().to("cpu", torch.float32).contiguous()
        key["item_tokens_sha256"] = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    return key


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def cache_file(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(_key_text(key).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"item-embeddings-{digest}.safetensors"


def _read_cached(
    path: Path, key: dict[str, Any], shape: tuple[int, int], dtype: torch.dtype
) -> tuple[Any, str]:
    """(embeddings, "") when the file checks out, else (None, why not)."""
    if not path.is_file():
        return None, "no cached file"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CACHE_FORMAT or metadata.get("key") != _key_text(key):
                return None, "the cached file's key differs"
            embeddings = handle.get_tensor(TENSOR_NAME)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        return None, f"the cached file is unreadable ({type(error).__name__})"
    if tuple(embeddings.shape) != shape or embeddings.dtype != dtype:
        return (
            None,
            f"the cached file holds {tuple(embeddings.shape)} {embeddings.dtype}, expected {shape} {dtype}",
        )
    if not torch.isfinite(embeddings).all() or embeddings[0].any():
        return None, "the cached file holds non-finite values or a non-zero padding row"
    return embeddings, ""


def cached_item_embeddings(
    encoder: ItemTextEncoder, cache_dir: str | Path, batch_size: int | None = None
) -> CachedEmbeddings:
    """All item embeddings of a frozen encoder, read from `cache_dir` when a valid file is there, else computed
    (`embed_all`) and written there."""
    trainable = [name for name, p in encoder.llm.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"cached item embeddings need a frozen item LLM, but {len(trainable)} of its parameters require "
            f"gradients (e.g. {trainable[0]}); freeze it (item_llm_trainable false) first"
        )
    key = embedding_cache_key(encoder)
    path = cache_file(Path(cache_dir), key)
    dtype = encoder.llm.get_input_embeddings().weight.dtype
    found, reason = _read_cached(path, key, (encoder.num_items + 1, encoder.hidden_size), dtype)
    if found is not None:
        return CachedEmbeddings(found.to(encoder.device), path, hit=True, reason="")
    embeddings = encoder.embed_all(batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(
            {TENSOR_NAME: embeddings.detach().cpu().contiguous()},
            str(tmp),
            metadata={"format": CACHE_FORMAT, "key": _key_text(key)},
        )
    return CachedEmbeddings(embeddings, path, hit=False, reason=reason)

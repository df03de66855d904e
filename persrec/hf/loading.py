"""Load Hugging Face models from local directories only, with one clear message for every way that fails.

Nothing is fetched from a hub: a model is a directory holding `config.json` (random weights: how tests and
from-scratch training build small models) plus, optionally, weights (`*.safetensors`; `.bin` is never
unpickled) or a GGUF file (dequantised on load, needs `gguf` and `accelerate`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from persrec.config import ConfigError

HF_EXTRA_HINT = "pip install 'persrec[hf]'"


def require_transformers() -> Any:
    """The transformers module, or a ConfigError naming the extra that provides it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as error:
        raise ConfigError(
            f"the Hugging Face backbones need transformers ({error.name} is not installed): {HF_EXTRA_HINT}"
        ) from None


def resolve_model_dir(value: str | Path, option: str) -> Path:
    """A local model directory, or the name of a model `persrec models list` finds (e.g. all-minilm-l6-v2);
    a hub id or a missing path is an error that says what to pass instead."""
    path = Path(value).expanduser()
    if not path.exists() and isinstance(value, str) and "/" not in value:
        from persrec.hf.catalog import find_local_models

        named = [model.path for model in find_local_models() if model.name == value]
        if named:
            path = named[0]
    if path.is_dir():
        if not (path / "config.json").is_file() and not gguf_files(path):
            raise ConfigError(
                f"--{option} {value}: the directory has no config.json (nor a .gguf file); expected a Hugging "
                "Face model directory (persrec models list shows the local models persrec can find)"
            )
        if not has_weights(path) and any(path.glob("*.bin")):
            raise ConfigError(
                f"--{option} {value}: holds only pickled .bin weights, which persrec never loads (they can run "
                "code); convert them to safetensors (model.save_pretrained(dir, safe_serialization=True))"
            )
        return path.resolve()
    looks_like_hub_id = isinstance(value, str) and value.count("/") == 1 and not path.exists()
    if looks_like_hub_id:
        raise ConfigError(
            f"--{option} {value}: looks like a hub id, but persrec loads models only from local directories; "
            "pass a local directory (persrec models list / persrec models convert NAME --output DIR)"
        )
    raise ConfigError(f"--{option} {value}: no such directory; expected a local Hugging Face model directory")


def gguf_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.gguf"))


def has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or bool(gguf_files(path))


def read_model_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path / 'config.json'}: not a readable JSON model config ({error})") from None


def load_base_model(path: Path, *, option: str, attn_implementation: str = "sdpa", dtype: Any = None) -> Any:
    """The model without its task head (`AutoModel`): pretrained weights when the directory has them, random
    weights from `config.json` otherwise. `.bin` (pickle) weights are refused rather than unpickled."""
    import torch

    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    dtype = dtype or torch.float32
    path = resolve_model_dir(path, option)
    try:
        if has_weights(path):
            kwargs: dict[str, Any] = {"attn_implementation": attn_implementation, "dtype": dtype}
            ggufs = gguf_files(path)
            if ggufs and not any(path.glob("*.safetensors")):
                kwargs["gguf_file"] = ggufs[0].name
            return transformers.AutoModel.from_pretrained(str(path), use_safetensors=not ggufs, **kwargs)
        config = transformers.AutoConfig.from_pretrained(str(path))
        config._attn_implementation = attn_implementation
        return transformers.AutoModel.from_config(
            config, attn_implementation=attn_implementation, dtype=dtype
        )
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--{option} {path}: could not load the model ({first_line})") from None


def load_tokenizer(path: Path, *, option: str) -> Any:
    """The tokenizer saved beside the model (`tokenizer.json` and friends, or the one inside a GGUF file)."""
    transformers = require_transformers()
    kwargs: dict[str, Any] = {}
    ggufs = gguf_files(path)
    has_tokenizer_files = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    if ggufs and not has_tokenizer_files:
        kwargs["gguf_file"] = ggufs[0].name
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"--{option} {path}: could not load a tokenizer from the model directory ({first_line}); "
            "expected tokenizer.json (or tokenizer_config.json with its vocabulary) beside config.json"
        ) from None

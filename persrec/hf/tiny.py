"""Small decoder configs of the architectures persrec is tested on, built locally (nothing downloaded).

Used by the tests and by `--model LLaMAID` without `--user_pretrain_dir`, which builds a Llama of the size the
persrec keys describe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from persrec.hf.loading import require_transformers

TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2")


def decoder_config(
    architecture: str,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    dropout: float = 0.0,
) -> Any:
    """A transformers config of `architecture` (llama, qwen2, mistral or gpt2) with a 2-token vocabulary:
    persrec feeds item vectors, never tokens."""
    transformers = require_transformers()
    intermediate = intermediate_size or 4 * hidden_size
    kv_heads = num_kv_heads or num_heads
    if architecture == "gpt2":
        return transformers.GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate,
            n_positions=max_positions,
            vocab_size=2,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=dropout,
            embd_pdrop=0.0,
            attn_pdrop=dropout,
        )
    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }
    if architecture not in classes:
        raise ValueError(
            f"unknown architecture {architecture!r}; expected one of {', '.join(TINY_ARCHITECTURES)}"
        )
    return classes[architecture](
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        vocab_size=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        attention_dropout=dropout,
    )


def decoder_config_from_json(path: Path) -> Any:
    """A transformers config from a saved config.json (any architecture transformers knows)."""
    transformers = require_transformers()
    values = json.loads(path.read_text())
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def build_decoder(config: Any, attn_implementation: str = "sdpa") -> Any:
    """Random-weight `AutoModel` (no task head) of a config."""
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModel.from_config(config, attn_implementation=attn_implementation)

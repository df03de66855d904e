"""The item LLM of HLLM: item text -> one embedding, with learnable item tokens appended to the text.

Each item's tokens (prompt + `key: value` fields, truncated to `max_text_length`) are followed by
`item_emb_token_n` learnable item tokens fed as input embeddings. The embedding is the last hidden state at the item
token; with several item tokens, the mean of their last hidden states (each one sees the text and the tokens
before it in a decoder, so the mean pools views of increasing context); with none, the mean over the item's real
tokens (padding excluded), which is what a frozen encoder such as MiniLM was trained for.

Items are right-padded, so in a decoder no real token ever attends to padding and default positions are right.
Batches are length-sorted by default: items of similar length share a batch and the padding waste stays small
(measured in `last_stats`; naive batching in catalog order is kept for comparison).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from persrec.config import ConfigError
from persrec.hf.item_text import ItemTexts
from persrec.hf.loading import load_base_model, load_tokenizer, resolve_model_dir

logger = logging.getLogger(__name__)

ITEM_TOKEN_INIT_STD = 0.02
TOKENIZE_CHUNK = 8192


@dataclass(frozen=True)
class ItemEncoderOptions:
    """`max_text_length` counts the prompt and the tokenizer's special tokens, not the item tokens."""

    max_text_length: int = 256
    item_emb_token_n: int = 1
    batch_size: int = 64
    length_sorted: bool = True
    attn_implementation: str = "sdpa"

    def check(self) -> ItemEncoderOptions:
        if self.max_text_length < 1:
            raise ConfigError(
                f"--MAX_TEXT_LENGTH: expected a positive token count, got {self.max_text_length}"
            )
        if self.item_emb_token_n < 0:
            raise ConfigError(f"--item_emb_token_n: expected 0 or more, got {self.item_emb_token_n}")
        if self.batch_size < 1:
            raise ConfigError(f"item encoder batch size: expected a positive count, got {self.batch_size}")
        return self

    @property
    def pooling(self) -> str:
        return "mean" if self.item_emb_token_n == 0 else "item_token"


@dataclass
class BatchingStats:
    """Token slots the item LLM computed vs the real ones (text + item tokens) among them."""

    items: int = 0
    batches: int = 0
    real_tokens: int = 0
    slots: int = 0
    seconds: float = 0.0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.slots if self.slots else 0.0

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0


def plan_batches(lengths: np.ndarray, batch_size: int, length_sorted: bool) -> list[np.ndarray]:
    """Positions into `lengths`, in batches of at most `batch_size`: by increasing length, or in the given
    order (naive batching)."""
    order = np.argsort(lengths, kind="stable") if length_sorted else np.arange(len(lengths))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def padded_slots(lengths: np.ndarray, batches: Sequence[np.ndarray]) -> int:
    """Token slots a right-padded forward over these batches computes."""
    return int(sum(len(batch) * int(lengths[batch].max()) for batch in batches if len(batch)))


def tokenize_items(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """All items' token ids, flat (int64), and each item's count: tokenised in chunks into arrays, so a
    catalogue of millions of items never lives as Python lists of ints."""
    parts, lengths = [], []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        ids = tokenizer(list(texts[start : start + TOKENIZE_CHUNK]), truncation=True, max_length=max_length)
        rows = ids["input_ids"]
        lengths.append(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)))
        parts.append(
            np.fromiter((t for row in rows for t in row), dtype=np.int64, count=int(lengths[-1].sum()))
        )
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(parts), np.concatenate(lengths)


class ItemTextEncoder(nn.Module):
    """Item LLM over the item texts of one catalogue: `embed` (with gradients) for training, `embed_all`
    (no gradients, row 0 = padding zeros) for evaluation and the frozen path."""

    def __init__(
        self,
        model_dir: str | Path,
        texts: ItemTexts,
        options: ItemEncoderOptions | None = None,
        *,
        option: str = "item_pretrain_dir",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.options = (options or ItemEncoderOptions()).check()
        self.model_dir = resolve_model_dir(model_dir, option)
        self.texts = texts
        self.llm = load_base_model(
            self.model_dir, option=option, attn_implementation=self.options.attn_implementation, dtype=dtype
        )
        tokenizer = load_tokenizer(self.model_dir, option=option)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        flat, self.text_lengths = tokenize_items(tokenizer, texts.texts[1:], self.options.max_text_length)
        if (self.text_lengths == 0).any():
            empty = (np.flatnonzero(self.text_lengths == 0) + 1)[:5].tolist()
            raise ConfigError(
                f"--{option} {self.model_dir}: the tokenizer gives no token for item(s) {empty}"
            )
        offsets = np.concatenate([[0], np.cumsum(self.text_lengths)])
        self.register_buffer("token_ids", torch.from_numpy(flat), persistent=False)
        self.register_buffer("token_starts", torch.tensor(offsets[:-1], dtype=torch.long), persistent=False)
        self.hidden_size = int(self.llm.config.hidden_size)
        embedding_dtype = self.llm.get_input_embeddings().weight.dtype
        count = self.options.item_emb_token_n
        self.item_tokens = (
            nn.Parameter(torch.randn(count, self.hidden_size, dtype=embedding_dtype) * ITEM_TOKEN_INIT_STD)
            if count
            else None
        )
        self._forward_kwargs = {"use_cache": False} if self._accepts("use_cache") else {}
        self.last_stats = BatchingStats()

    def _accepts(self, name: str) -> bool:
        return name in inspect.signature(self.llm.forward).parameters

    @property
    def num_items(self) -> int:
        return len(self.text_lengths)

    @property
    def device(self) -> torch.device:
        return self.token_ids.device

    def _encode_batch(self, items: np.ndarray) -> torch.Tensor:
        """Embeddings [b, H] of item indices `items` (1..N), one right-padded forward."""
        n_tokens = self.options.item_emb_token_n
        device = self.device
        lengths = torch.as_tensor(self.text_lengths[items - 1], device=device)  # [b]
        width = int(lengths.max()) + n_tokens
        columns = torch.arange(width, device=device)
        is_text = columns[None, :] < lengths[:, None]  # [b, L]
        gather = (self.token_starts[torch.as_tensor(items - 1, device=device)][:, None] + columns).clamp(
            max=len(self.token_ids) - 1
        )
        ids = torch.where(is_text, self.token_ids[gather], self.pad_token_id)
        attention_mask = (columns[None, :] < (lengths + n_tokens)[:, None]).long()
        embeds = self.llm.get_input_embeddings()(ids)  # [b, L, H]
        if n_tokens:
            rows = torch.arange(len(items), device=device).repeat_interleave(n_tokens)
            slots = (lengths[:, None] + torch.arange(n_tokens, device=device)).reshape(-1)
            values = self.item_tokens.to(embeds.dtype).repeat(len(items), 1)
            embeds = embeds.index_put((rows, slots), values)
        hidden = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, **self._forward_kwargs)
        hidden = hidden.last_hidden_state  # [b, L, H]
        self.last_stats.real_tokens += int(attention_mask.sum())
        self.last_stats.slots += attention_mask.numel()
        self.last_stats.batches += 1
        if n_tokens:
            return hidden[rows, slots].reshape(len(items), n_tokens, -1).mean(dim=1)
        weights = is_text.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(dim=1) / lengths[:, None].to(hidden.dtype)

    def _check_indices(self, items: np.ndarray) -> None:
        if items.size and (items.min() < 0 or items.max() > self.num_items):
            raise IndexError(f"item indices must be in 0..{self.num_items}, got {items.min()}..{items.max()}")

    def embed(self, item_indices: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Embeddings [..., H] of item indices of any shape (0 = padding -> zeros), with gradients to the item
        LLM and item tokens. Repeated items are encoded once."""
        flat = item_indices.reshape(-1).cpu()
        unique, inverse = torch.unique(flat, return_inverse=True)
        items = unique.numpy()
        self._check_indices(items)
        real = items[items > 0]
        start = time.perf_counter()
        self.last_stats = BatchingStats(items=len(real))
        batches = plan_batches(
            self.text_lengths[real - 1], batch_size or self.options.batch_size, self.options.length_sorted
        )
        parts = [self._encode_batch(real[batch]) for batch in batches]
        order = torch.as_tensor(np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64))
        encoded = torch.cat(parts) if parts else self._zeros(0)
        encoded = encoded[torch.argsort(order).to(encoded.device)]  # back to the order of `real`
        if len(real) < len(items):  # index 0 was asked for: its row is zeros
            encoded = torch.cat([self._zeros(1).to(encoded.dtype), encoded])
        self.last_stats.seconds = time.perf_counter() - start
        return encoded[inverse.to(encoded.device)].reshape(*item_indices.shape, -1)

    def _zeros(self, rows: int) -> torch.Tensor:
        dtype = self.llm.get_input_embeddings().weight.dtype
        return torch.zeros(rows, self.hidden_size, dtype=dtype, device=self.device)

    @torch.no_grad()
    def embed_all(self, batch_size: int | None = None) -> torch.Tensor:
        """Every item's embedding [N + 1, H] (row 0 = padding zeros), in eval mode and without gradients."""
        was_training = self.training
        self.eval()
        start = time.perf_counter()
        self.last_stats = BatchingStats(items=self.num_items)
        out = self._zeros(self.num_items + 1)
        try:
            for batch in plan_batches(
                self.text_lengths, batch_size or self.options.batch_size, self.options.length_sorted
            ):
                items = batch + 1
                out[torch.as_tensor(items, device=self.device)] = self._encode_batch(items).to(out.dtype)
        finally:
            self.train(was_training)
        stats = self.last_stats
        stats.seconds = time.perf_counter() - start
        logger.info(
            "item embeddings: %d items in %.1f s (%.1f items/s), %d batches, padding %.1f%% of token slots",
            stats.items,
            stats.seconds,
            stats.items_per_second,
            stats.batches,
            100 * stats.padding_fraction,
        )
        return out

    def describe(self) -> dict[str, Any]:
        """What decides the embeddings besides the weights: the key of the on-disk embedding cache."""
        return {
            "max_text_length": self.options.max_text_length,
            "item_emb_token_n": self.options.item_emb_token_n,
            "pooling": self.options.pooling,
            "dtype": str(self.llm.get_input_embeddings().weight.dtype).removeprefix("torch."),
            "attn_implementation": self.options.attn_implementation,
            "hidden_size": self.hidden_size,
            "num_items": self.num_items,
        }

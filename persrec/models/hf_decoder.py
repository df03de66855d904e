"""A Hugging Face causal decoder as a persrec backbone: LLaMA-ID, and the user LLM of HLLM.

The decoder reads item vectors as `inputs_embeds`; the 4-D attention mask is persrec's own (the causal part and
the experts' segment blocking included, nothing added by transformers), and positions are given explicitly, so
a cached expert key keeps the rotary phase (or GPT-2's learned position) of its original slot. With that, the
expert mechanism in `persrec.models.experts` drives this backbone exactly as it drives SASRec and HSTU: the same
masks, the same `compress` / `refresh` / `predict`, and cached scores equal the full masked pass.

Only the public transformers API is used: `AutoModel` (no task head), `inputs_embeds`, a 4-D `attention_mask`,
`position_ids`, the cache argument and gradient checkpointing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from persrec.hf.compat import build_cache, cache_argument, cache_tensors, output_cache
from persrec.models.base import BackboneConfig, KVCache, SequenceBackbone, full_attention_mask

# transformers' names of the kernels that honour persrec's masks exactly (see persrec.hf notes in the README).
HF_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
# The user decoder's config.json, as saved beside a model's weights.
USER_MODEL_CONFIG = "user_model_config.json"


def decoder_width(decoder: Any) -> int:
    return int(decoder.config.hidden_size)


def decoder_positions(decoder: Any) -> int | None:
    """How many positions the decoder can encode (None: no limit stated, e.g. rotary without a bound)."""
    value = getattr(decoder.config, "max_position_embeddings", None)
    return None if value is None else int(value)


def shared_positions(positions: Tensor) -> Tensor:
    """[1, L] when every sequence has the same positions (an expanded row, as the expert mechanism passes):
    the decoder then computes its rotary tables once instead of once per sequence. Read from the strides, so
    nothing waits for the device."""
    if positions.shape[0] > 1 and positions.stride(0) == 0:
        return positions[:1]
    return positions


class HFDecoderBackbone(SequenceBackbone):
    """Item vectors -> a transformers decoder -> hidden states, under any boolean mask, with key/value caches.

    Items: an ID table of width `config.embedding_dim`, projected linearly to the decoder's width when the two
    differ (scores are taken in the decoder's width, against the projected item vectors). Subclasses change
    where item vectors come from (HLLM: an item LLM) by overriding `item_vectors`.
    """

    learned_positions = False

    def __init__(self, config: BackboneConfig, decoder: nn.Module) -> None:
        super().__init__(config)
        self.decoder = decoder
        width = decoder_width(decoder)
        limit = decoder_positions(decoder)
        if limit is not None and limit < config.max_positions:
            raise ValueError(
                f"the decoder encodes {limit} positions (max_position_embeddings) but the window needs "
                f"{config.max_positions}; use a shorter MAX_ITEM_LIST_LENGTH or a decoder config with more"
            )
        implementation = getattr(decoder.config, "_attn_implementation", None) or "sdpa"
        if implementation not in HF_ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention implementation {implementation!r} of the decoder cannot take persrec's masks; "
                f"expected one of {', '.join(HF_ATTENTION_IMPLEMENTATIONS)}"
            )
        # eager adds a boolean mask as +1/+0 instead of masking (blocked tokens leak): give it a float mask.
        self._float_mask = implementation == "eager"
        # The decoder's token table is never read (inputs are item vectors): keep a 1-row stand-in so that
        # the model holds no dead parameters (DDP, FSDP and optimisers would otherwise carry them).
        decoder.set_input_embeddings(nn.Embedding(1, width))
        self.item_projection: nn.Module = (
            nn.Identity() if config.embedding_dim == width else nn.Linear(config.embedding_dim, width)
        )

    @property
    def dim(self) -> int:
        return decoder_width(self.decoder)

    # ---- items ---------------------------------------------------------------------------------------------
    def item_vectors(self, item_ids: Tensor) -> Tensor:
        """Item vectors before the projection: [...] -> [..., embedding_dim]."""
        return self.item_embedding(item_ids)

    def all_item_vectors(self) -> Tensor:
        return self.item_embedding.weight

    def embed_items(self, item_ids: Tensor) -> Tensor:
        return self.item_projection(self.item_vectors(item_ids))

    def all_item_embeddings(self) -> Tensor:
        return self.item_projection(self.all_item_vectors())

    def input_embeddings(self, item_ids: Tensor) -> Tensor:
        return self.embed_items(item_ids)

    # ---- layers --------------------------------------------------------------------------------------------
    def _attention_mask(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, L, S] bool -> the [B, 1, L, S] mask the decoder's kernel reads exactly."""
        mask = mask[:, None]
        if not self._float_mask:
            return mask
        blocked = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return blocked.masked_fill_(~mask, torch.finfo(dtype).min)

    def encode(
        self,
        inputs: Tensor,
        mask: Tensor,
        positions: Tensor,
        timestamps: Tensor | None = None,
        cache: KVCache | None = None,
        mask_includes_cache: bool = False,
        return_cache: bool = False,
        output_rows: int | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """Same contract as `SequenceBackbone.encode`; `timestamps` are carried in caches but not read (and
        the decoder computes every row: `output_rows` only trims the result)."""
        if not mask_includes_cache:
            mask = full_attention_mask(mask, cache)
        arguments: dict[str, Any] = {
            "inputs_embeds": self.input_dropout(inputs),
            "attention_mask": self._attention_mask(mask, inputs.dtype),
            "position_ids": shared_positions(positions),
            "use_cache": return_cache or cache is not None,
        }
        if cache is not None:
            # A fresh cache object per call: the forward appends the current tokens to whatever it is given.
            arguments[cache_argument(self.decoder)] = build_cache(
                list(zip(cache.keys, cache.values, strict=True))
            )
        output = self.decoder(**arguments)
        hidden = output[0] if output_rows is None else output[0][:, -output_rows:]
        if not return_cache:
            return hidden, None
        start = 0 if cache is None else cache.length
        pairs = cache_tensors(output_cache(output))
        keys = [k[:, :, start:] for k, _ in pairs]
        values = [v[:, :, start:] for _, v in pairs]
        valid = torch.ones_like(positions, dtype=torch.bool)
        return hidden, KVCache(keys, values, positions, timestamps, valid)

    def architecture_files(self) -> dict[str, str]:
        # Saved beside the weights so a model directory rebuilds without the original --user_pretrain_dir.
        return {USER_MODEL_CONFIG: self.decoder.config.to_json_string()}

    # ---- scale ---------------------------------------------------------------------------------------------
    def shardable_layers(self) -> list[nn.Module]:
        """The decoder's transformer blocks (the unit FSDP shards and gradient checkpointing recomputes)."""
        return transformer_blocks(self.decoder)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_hf_gradient_checkpointing(self.decoder, enabled)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a transformers model: its ModuleList of `config.num_hidden_layers` modules."""
    layer_count = int(model.config.num_hidden_layers)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == layer_count:
            return list(module)
    raise ValueError(f"no list of {layer_count} blocks found in {type(model).__name__}")


def set_hf_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each block's activations in the backward pass (transformers' own mechanism; its method is
    `activation_checkpointing_*` from 5.x on, `gradient_checkpointing_*` before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()

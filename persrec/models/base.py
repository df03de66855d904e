"""The contract every backbone fulfils, and the pieces they share.

A backbone turns a sequence of input vectors into hidden states under an arbitrary boolean attention mask, optionally
attending to cached key/values of earlier tokens. Keeping that contract small is what lets the expert-token mechanism
(`persrec.models.experts`) work for every backbone without knowing its internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from persrec.models.mask_cache import PassMask


@dataclass
class BackboneConfig:
    """Shape and regularisation of a sequence backbone.

    `max_positions` bounds the learned position table: the item window plus any inserted expert tokens.
    """

    num_items: int
    max_positions: int = 200
    embedding_dim: int = 50
    num_layers: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    attn_dropout: float = 0.0
    # HSTU only: per-head query/key and value widths (0 = embedding_dim // num_heads).
    qk_dim: int = 0
    v_dim: int = 0
    # HSTU only: the relative position / time bias of the original paper.
    relative_position_bias: bool = False
    relative_time_bias: bool = False
    time_buckets: int = 128
    # SASRec only: feed-forward width (0 = embedding_dim).
    ffn_dim: int = 0
    # HSTU only: auto, native, tiled or reference (see persrec.models.hstu_attention).
    attention_implementation: str = "auto"
    # Std of the item embedding init. Items are scored by cosine, so Adam's angular step is about lr / norm:
    # small vectors (0.02, as in RecBole and generative-recommenders) let item directions move quickly. With
    # std d^-0.5 (norm ~1) SASRec on ML-1M barely leaves the popularity baseline in 4 epochs (README).
    item_init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.embedding_dim % self.num_heads and not (self.qk_dim and self.v_dim):
            raise ValueError(
                f"embedding_dim={self.embedding_dim} is not divisible by num_heads={self.num_heads}; "
                "choose compatible values or set qk_dim and v_dim explicitly"
            )


@dataclass
class KVCache:
    """Per-layer keys/values of tokens already processed, plus what attention needs to know about them.

    keys[l], values[l]: [B, H, C, d_head]; positions: [B, C] int64; timestamps: [B, C] int64 or None;
    valid: [B, C] bool (False for padding slots, which no query may attend to).
    """

    keys: list[Tensor]
    values: list[Tensor]
    positions: Tensor
    timestamps: Tensor | None
    valid: Tensor

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def select(self, index: Tensor) -> KVCache:
        """Keep only cached slots `index` ([C'] int64), e.g. the expert tokens of a longer sequence."""
        return KVCache(
            keys=[k.index_select(2, index) for k in self.keys],
            values=[v.index_select(2, index) for v in self.values],
            positions=self.positions.index_select(1, index),
            timestamps=None if self.timestamps is None else self.timestamps.index_select(1, index),
            valid=self.valid.index_select(1, index),
        )

    @staticmethod
    def concat(caches: list[KVCache]) -> KVCache:
        """Join caches along the token axis, oldest first."""
        first = caches[0]
        return KVCache(
            keys=[torch.cat([c.keys[i] for c in caches], dim=2) for i in range(len(first.keys))],
            values=[torch.cat([c.values[i] for c in caches], dim=2) for i in range(len(first.values))],
            positions=torch.cat([c.positions for c in caches], dim=1),
            timestamps=None if first.timestamps is None else torch.cat([c.timestamps for c in caches], dim=1),
            valid=torch.cat([c.valid for c in caches], dim=1),
        )


def causal_padding_mask(valid: Tensor) -> Tensor:
    """Causal mask over one sequence that also hides padding keys.

    valid: [B, L] bool -> [B, L, L] bool (True = may attend). Every query keeps its own diagonal so that rows of
    padding tokens are never empty (an empty softmax row is NaN); their outputs are ignored downstream.
    """
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril_()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return (causal & valid[:, None, :]) | eye


def full_attention_mask(mask: Tensor, cache: KVCache | None) -> Tensor:
    """Prepend the cache's columns to a [B, L, L] mask: every query may see every valid cached slot.

    Callers that need finer control over cached columns (several expert segments, stale experts) build the
    [B, L, C + L] mask themselves and pass it with `mask_includes_cache=True`.
    """
    if cache is None:
        return mask
    cached = cache.valid[:, None, :].expand(-1, mask.shape[1], -1)
    return torch.cat([cached, mask], dim=2)


class SequenceBackbone(nn.Module):
    """Item-ID embeddings + learned positions + a stack of attention layers (defined by subclasses).

    Subclasses implement `_layers_forward`. Everything a training step, the evaluator or the expert mechanism
    needs goes through `embed_items`, `input_embeddings`, `encode` and `forward`. A backbone whose layers encode
    positions themselves (the Hugging Face decoders: rotary or their own tables) sets `learned_positions = False`.
    """

    learned_positions = True

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embedding_dim
        self.item_embedding = nn.Embedding(config.num_items + 1, dim, padding_idx=0)
        if self.learned_positions:
            self.position_embedding = nn.Embedding(config.max_positions, dim)
        self.input_dropout = nn.Dropout(config.dropout)
        self.embedding_scale = math.sqrt(dim)
        nn.init.normal_(self.item_embedding.weight, std=config.item_init_std)
        if self.learned_positions:
            nn.init.normal_(self.position_embedding.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.gradient_checkpointing = False

    @property
    def dim(self) -> int:
        return self.config.embedding_dim

    def shardable_layers(self) -> list[nn.Module]:
        """The blocks a sharded run (FSDP) shards one by one, so only one block's full weights exist at a time.

        Backbones whose blocks live elsewhere (a Hugging Face decoder's `model.layers`) override this.
        """
        return list(self.layers)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (memory for time).

        Backbones that delegate their blocks to another library override this to switch on its own mechanism.
        """
        self.gradient_checkpointing = enabled

    def embed_items(self, item_ids: Tensor) -> Tensor:
        """Output-side item vectors used for scoring and the loss: ids [...] -> [..., D]."""
        return self.item_embedding(item_ids)

    def all_item_embeddings(self) -> Tensor:
        """[N + 1, D]; row 0 is padding and is never ranked."""
        return self.item_embedding.weight

    def input_embeddings(self, item_ids: Tensor) -> Tensor:
        """Input-side vectors of items (before positions): [B, L] -> [B, L, D]."""
        return self.item_embedding(item_ids) * self.embedding_scale

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
        """Run the layers over already-embedded tokens.

        inputs: [B, L, D] input vectors (items already scaled, expert tokens as they are); mask: [B, L, L] bool
        over the current tokens, or [B, L, C + L] with `mask_includes_cache` (columns: cache first);
        positions: [B, L] int64 position ids; timestamps: [B, L] int64 or None; cache: key/values of C earlier
        tokens. Returns hidden states [B, L, D] (after the backbone's output norm, if it has one) and, with `return_cache`, the key/values of
        the current tokens only (not the earlier cache). `output_rows` n: only the last n hidden states are
        wanted ([B, n, D]); a backbone may then spare its last layer the other rows' queries.
        """
        hidden = self.input_dropout(inputs + self.position_embedding(positions))
        if not mask_includes_cache:
            mask = full_attention_mask(mask, cache)
        return self._layers_forward(hidden, mask, positions, timestamps, cache, return_cache, output_rows)

    def forward(
        self, item_ids: Tensor, timestamps: Tensor | None = None, output_rows: int | None = None
    ) -> Tensor:
        """Plain causal forward over left-padded item ids [B, L] -> hidden states [B, L, D] (the last
        `output_rows` of them when given)."""
        valid = item_ids > 0
        positions = torch.arange(item_ids.shape[1], device=item_ids.device).expand_as(item_ids)
        hidden, _ = self.encode(
            self.input_embeddings(item_ids),
            causal_padding_mask(valid),
            positions,
            timestamps,
            output_rows=output_rows,
        )
        return hidden

    def _layers_forward(
        self,
        hidden: Tensor,
        mask: Tensor,
        positions: Tensor,
        timestamps: Tensor | None,
        cache: KVCache | None,
        return_cache: bool,
        output_rows: int | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """Run `self.layers` in order, collecting each layer's key/values of the current tokens; the last
        layer is told `output_rows` (its key/values still cover every token).

        What the layers share is computed here once per pass rather than in every layer: the mask travels as a
        `PassMask` (the attention kernels' host-side summaries of it are built by the first layer), and
        `_layer_context` derives the rest (e.g. HSTU's relative-bias indices) from positions and timestamps.
        """
        shared = PassMask(mask)
        # keep_present: whether the layers' key/values outlive the pass (a layer may reuse scratch otherwise).
        context = {**self._layer_context(positions, timestamps, cache), "keep_present": return_cache}
        keys, values = [], []
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            past = None if cache is None else (cache.keys[index], cache.values[index])
            if index == last and output_rows is not None:
                context = {**context, "output_rows": output_rows}
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant: works with FSDP's hooks and with inputs that need no gradient; the RNG state
                # is replayed, so dropout draws the same masks when the block is recomputed.
                hidden, (k, v) = checkpoint(
                    self._call_layer, layer, hidden, shared, past, context, use_reentrant=False
                )
            else:
                hidden, (k, v) = self._call_layer(layer, hidden, shared, past, context)
            keys.append(k)
            values.append(v)
        if output_rows is not None and hidden.shape[1] > output_rows:
            hidden = hidden[:, -output_rows:]  # a backbone whose last layer computed every row
        hidden = self._output_norm(hidden)
        if not return_cache:
            return hidden, None
        valid = torch.ones_like(positions, dtype=torch.bool)
        return hidden, KVCache(keys, values, positions, timestamps, valid)

    def _layer_context(self, positions: Tensor, timestamps: Tensor | None, cache: KVCache | None) -> dict:
        """What every layer of one pass needs besides hidden states and mask (computed once per pass)."""
        return {}

    def _call_layer(
        self,
        layer: nn.Module,
        hidden: Tensor,
        mask: PassMask,
        past: tuple[Tensor, Tensor] | None,
        context: dict,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def _output_norm(self, hidden: Tensor) -> Tensor:
        return hidden

    def architecture_files(self) -> dict[str, str]:
        """Files (name -> text) that rebuild this backbone's architecture beside its weights, beyond the run's
        config: none for the ID backbones, the decoder's config.json for the Hugging Face ones."""
        return {}

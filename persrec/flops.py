"""Matmul FLOPs of one transformer block of any persrec backbone, for the analytic counts of the benchmarks.

persrec's own layers (SASRec, HSTU) are counted from their `nn.Linear` modules and attention widths; a Hugging
Face decoder (LLaMA-ID, HLLM's user model) from its config, since its blocks are transformers' modules: q and o
projections over all heads, k and v over the key/value heads only (grouped-query attention), and the gated MLP
(gate, up, down). Attention over a (query, key) pair costs the same with grouped-query attention as without:
every query head still takes a dot product with a key and a weighted sum of values.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from persrec.models.base import SequenceBackbone


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one block: `linear` per token, `per_pair` per allowed (query, key) pair; `depth` blocks."""

    linear: int
    per_pair: int
    depth: int


def hf_decoder_layer_flops(config: object) -> LayerFlops:
    """A Llama-style decoder (Llama, Qwen2, Mistral: q/k/v/o projections and a gated MLP) from its config."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = int(config.intermediate_size)
    query_width, kv_width = heads * head_dim, kv_heads * head_dim
    projections = 2 * hidden * query_width + 2 * 2 * hidden * kv_width + 2 * query_width * hidden
    mlp = 3 * 2 * hidden * intermediate
    return LayerFlops(projections + mlp, 2 * (query_width + query_width), int(config.num_hidden_layers))


def layer_flops(backbone: SequenceBackbone) -> LayerFlops:
    """Linear-layer and attention FLOPs of one block of `backbone` (see the module docstring)."""
    decoder = getattr(backbone, "decoder", None)
    if decoder is not None:
        return hf_decoder_layer_flops(decoder.config)
    layer = backbone.layers[0]
    linear = sum(2 * m.in_features * m.out_features for m in layer.modules() if isinstance(m, nn.Linear))
    head_dim = backbone.dim // layer.heads
    qk_width = layer.heads * getattr(layer, "qk_dim", head_dim)
    v_width = layer.heads * getattr(layer, "v_dim", head_dim)
    return LayerFlops(linear, 2 * (qk_width + v_width), len(backbone.layers))

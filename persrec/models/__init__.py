"""Sequence backbones. `build_backbone` maps a model name (including the authors' aliases) to a class."""

from persrec.models.base import BackboneConfig, KVCache, SequenceBackbone
from persrec.models.registry import BACKBONES, build_backbone, canonical_model_name

__all__ = [
    "BACKBONES",
    "BackboneConfig",
    "KVCache",
    "SequenceBackbone",
    "build_backbone",
    "canonical_model_name",
]

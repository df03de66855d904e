"""Model names accepted in configs, and the classes behind them."""

from __future__ import annotations

import difflib

from persrec.models.base import BackboneConfig, SequenceBackbone
from persrec.models.hstu import HSTU
from persrec.models.sasrec import SASRec

BACKBONES: dict[str, type[SequenceBackbone]] = {"SASRec": SASRec, "HSTU": HSTU}
# The authors' names for the same backbones with expert tokens switched on.
ALIASES = {"PersonalizedSASRec": "SASRec", "PersonalizedHSTU": "HSTU"}


def canonical_model_name(name: str) -> str:
    """Resolve case-insensitively and through aliases; unknown names get a suggestion."""
    known = {key.lower(): key for key in [*BACKBONES, *ALIASES]}
    key = known.get(name.lower())
    if key is None:
        close = difflib.get_close_matches(name, list(known.values()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; known models: {', '.join(sorted(known.values()))}")
    return ALIASES.get(key, key)


def build_backbone(name: str, config: BackboneConfig) -> SequenceBackbone:
    return BACKBONES[canonical_model_name(name)](config)

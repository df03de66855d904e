"""The score-tile kernel of the tiled HSTU path: same values as the PyTorch ops it replaces, for every kind of
bias (gathered, dense, none), broadcast and expanded layouts, ragged rows, and through the whole attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import persrec.models.hstu_attention as attention
from persrec.models import hstu_epilogue
from persrec.models.hstu_attention import GatheredBias, hstu_attention, hstu_attention_reference
from persrec.models.mask_cache import PassMask

pytestmark = pytest.mark.skipif(
    not hstu_epilogue.available(torch.zeros(1)),
    reason="no C compiler or no AVX2: the score-tile kernel is unavailable (the PyTorch ops run instead)",
)


@pytest.mark.parametrize("cols", [1, 7, 8, 21])
@pytest.mark.parametrize("kind", ["gathered", "gathered-broadcast", "dense", "dense-expanded", "none"])
@pytest.mark.parametrize("masked", [True, False])
def test_the_kernel_equals_bias_silu_mask_in_torch(cols, kind, masked):
    gen = torch.Generator().manual_seed(cols)
    groups, heads, rows = 3, 2, 5
    scores = torch.randn(groups * heads, rows, cols, generator=gen) * 4
    table = torch.randn(50, generator=gen)
    index = torch.randint(0, 50, (1 if kind.endswith("broadcast") else groups, rows, cols + 3), generator=gen)
    index = index.to(torch.int32)[:, :, 2 : 2 + cols]  # a strided view, as a tile of the pass's index
    dense = torch.randn(groups, rows, cols + 1, generator=gen)[:, :, :cols]
    if kind == "dense-expanded":
        dense = dense[:1].expand(groups, rows, cols)
    mask = (torch.rand(groups, rows, cols, generator=gen) < 0.6) if masked else None
    bias = {
        "gathered": table[index.long()],
        "gathered-broadcast": table[index.long()].expand(groups, rows, cols),
        "dense": dense,
        "dense-expanded": dense,
        "none": torch.zeros(groups, rows, cols),
    }[kind]
    expected = F.silu(scores.view(groups, heads, rows, cols) + bias[:, None])
    if mask is not None:
        expected = expected * mask[:, None]
    got = scores.clone()
    arguments = {
        "gathered": {"table": table, "index": index},
        "gathered-broadcast": {"table": table, "index": index},
        "dense": {"bias": dense},
        "dense-expanded": {"bias": dense},
        "none": {},
    }[kind]
    hstu_epilogue.apply(got, heads, mask=mask, **arguments)
    torch.testing.assert_close(got.view(groups, heads, rows, cols), expected, rtol=2e-6, atol=1e-6)
    if mask is not None:
        assert not got.view(groups, heads, rows, cols)[~mask[:, None].expand(-1, heads, -1, -1)].any()


def _causal(batch: int, length: int, keys: int, gen: torch.Generator) -> torch.Tensor:
    allowed = torch.arange(keys)[None, :] <= torch.arange(length)[:, None] + keys - length
    return allowed & (torch.rand(batch, length, keys, generator=gen) < 0.8)


@pytest.mark.parametrize("gathered", [True, False])
def test_the_tiled_attention_with_the_kernel_matches_the_reference_and_the_torch_ops(monkeypatch, gathered):
    monkeypatch.setattr(attention, "TILE_BYTES", 64 * 40)  # many tiles, some fully visible, some partial
    gen = torch.Generator().manual_seed(3)
    batch, heads, length, cached, width = 3, 2, 37, 11, 40  # heads wider than the fused kernel takes
    keys = length + cached
    q, k, v = (torch.randn(batch, heads, n, width, generator=gen) for n in (length, keys, keys))
    mask = _causal(batch, length, keys, gen)
    table = torch.randn(300, generator=gen)
    keys8 = -(-keys // 8) * 8
    index = torch.randint(0, 300, (batch, length, keys8), generator=gen, dtype=torch.int32)

    def bias():
        dense = table[index.long()][:, :, :keys]
        return GatheredBias(table, index, keys, lambda: dense) if gathered else dense

    dense = table[index.long()][:, :, :keys]
    expected = hstu_attention_reference(q.double(), k.double(), v.double(), mask, dense.double(), 48.0)
    with torch.no_grad():
        fused = hstu_attention(q, k, v, PassMask(mask), bias(), 48.0, "tiled")
        monkeypatch.setattr(hstu_epilogue, "available", lambda scores: False)
        plain = hstu_attention(q, k, v, PassMask(mask), bias(), 48.0, "tiled")
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_training_gradients_through_the_kernel_match_the_reference(monkeypatch):
    monkeypatch.setattr(attention, "TILE_BYTES", 64 * 40)
    gen = torch.Generator().manual_seed(4)
    batch, heads, length, width = 2, 2, 29, 36
    leaves = [torch.randn(batch, heads, length, width, generator=gen).requires_grad_() for _ in range(3)]
    bias = torch.randn(batch, length, length, generator=gen).requires_grad_()
    mask = _causal(batch, length, length, gen)
    weight = torch.randn(batch, heads, length, width, generator=gen)
    grads = []
    for implementation in ("reference", "tiled"):
        for t in (*leaves, bias):
            t.grad = None
        (hstu_attention(*leaves, mask, bias, 29.0, implementation) * weight).sum().backward()
        grads.append([t.grad.clone() for t in (*leaves, bias)])
    for ref, got in zip(*grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

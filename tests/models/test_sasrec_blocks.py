"""SASRec's block-wise CPU attention must equal one attention call over the whole mask, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import persrec.models.sasrec as sasrec
from persrec.models import BackboneConfig, build_backbone
from persrec.models.experts import ExpertLayout, ExpertSequenceModel


def _one_call(q, k, v, mask, dropout_p):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=dropout_p)


@pytest.mark.parametrize("block", [1, 4, 7])
@pytest.mark.parametrize("cached", [0, 5])
def test_blocks_match_one_call(block, cached, monkeypatch):
    monkeypatch.setattr(sasrec, "QUERY_BLOCK", block)
    gen = torch.Generator().manual_seed(block + cached)
    batch, heads, length, width = 2, 3, 23, 4
    keys = cached + length
    causal = torch.arange(keys)[None, :] <= torch.arange(length)[:, None] + cached
    mask = causal & (torch.rand(batch, length, keys, generator=gen) < 0.7)
    mask[:, :, :3] = False  # padding keys
    rows = torch.arange(length)
    mask[:, rows, rows + cached] = True  # every row keeps its own slot
    leaves = [
        torch.randn(batch, heads, n, width, generator=gen, dtype=torch.float64).requires_grad_()
        for n in (length, keys, keys)
    ]
    weight = torch.randn(batch, heads, length, width, generator=gen, dtype=torch.float64)
    results = []
    for attention in (_one_call, sasrec.masked_attention):
        out = attention(*leaves, mask, 0.0)
        grads = torch.autograd.grad((out * weight).sum(), leaves)
        results.append([out, *grads])
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_blocks_skip_keys_hidden_from_every_query_of_the_block():
    layout = ExpertLayout(12, ((8, 2),))
    mask = layout.slot_tables["mask"][None].expand(3, -1, -1)
    ranges = sasrec._block_ranges(mask, 4)
    assert ranges == [(0, 4, 0, 4), (4, 8, 0, 8), (8, 12, 0, 12), (12, 14, 8, 14)]


def test_expert_model_gradients_do_not_depend_on_the_blocking(monkeypatch):
    layout = ExpertLayout(30, ((20, 3),))
    grads = []
    for block in (1000, 6):
        monkeypatch.setattr(sasrec, "QUERY_BLOCK", block)
        torch.manual_seed(0)
        config = BackboneConfig(
            num_items=40, max_positions=layout.length, embedding_dim=8, num_heads=2, dropout=0.0
        )
        model = ExpertSequenceModel(build_backbone("SASRec", config), layout).double()
        ids = torch.randint(1, 41, (2, 30), generator=torch.Generator().manual_seed(1))
        ids[1, :9] = 0
        model.item_hidden_states(ids).square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-9, atol=1e-12, msg=name)

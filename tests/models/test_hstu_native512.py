"""The AVX-512 forward of the fused HSTU attention: the reference's values, the AVX2 forward's up to rounding,
and only where no gradient is needed."""

from __future__ import annotations

import pytest
import torch

from persrec.models import hstu_native, hstu_native512
from persrec.models.hstu_attention import hstu_attention, hstu_attention_reference

pytestmark = pytest.mark.skipif(
    hstu_native512.library(8, 8) is None,
    reason="this CPU has no AVX-512 (or no C compiler): the AVX2 forward runs, tested in test_hstu_kernels",
)


def _inputs(batch, heads, length, cached, dk, dv, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = length + cached
    q = torch.randn(batch, heads, length, dk, generator=gen)
    k = torch.randn(batch, heads, keys, dk, generator=gen)
    v = torch.randn(batch, heads, keys, dv, generator=gen)
    allowed = torch.arange(keys)[None, :] <= torch.arange(length)[:, None] + cached
    mask = allowed & (torch.rand(batch, length, keys, generator=gen) < 0.8)
    return q, k, v, mask, torch.randn(batch, length, keys, generator=gen)


@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 37, 11, 8, 8),
        (1, 8, 64, 4, 8, 8),
        (3, 2, 5, 0, 16, 12),
        (2, 1, 61, 30, 25, 25),
        (1, 2, 17, 1, 3, 5),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_avx512_forward_equals_the_reference_and_the_avx2_forward(monkeypatch, shape, with_bias):
    q, k, v, mask, bias = _inputs(*shape, seed=sum(shape))
    bias = bias if with_bias else None
    calls = []
    real = hstu_native512.library
    monkeypatch.setattr(hstu_native512, "library", lambda dk, dv: calls.append(dk) or real(dk, dv))
    with torch.inference_mode():
        wide = hstu_attention(q, k, v, mask, bias, 50.0, "native")
    assert calls, "the AVX-512 build was not asked for"
    monkeypatch.setattr(hstu_native512, "library", lambda dk, dv: None)
    with torch.inference_mode():
        narrow = hstu_attention(q, k, v, mask, bias, 50.0, "native")
    reference = hstu_attention_reference(
        q.double(), k.double(), v.double(), mask, None if bias is None else bias.double(), 50.0
    )
    torch.testing.assert_close(wide.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wide, narrow, rtol=1e-5, atol=1e-6)


def test_a_pass_that_needs_gradients_keeps_the_layout_the_backward_reads(monkeypatch):
    q, k, v, mask, bias = _inputs(2, 2, 20, 5, 8, 8, seed=3)
    q.requires_grad_()
    asked = []
    monkeypatch.setattr(hstu_native512, "library", lambda dk, dv: asked.append(dk))
    out = hstu_attention(q, k, v, mask, bias, 25.0, "native")
    out.sum().backward()
    assert not asked and q.grad is not None
    expected = hstu_attention_reference(
        q.detach().double().requires_grad_(), k.double(), v.double(), mask, bias.double(), 25.0
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(hstu_native512.ENV_SWITCH, "0")
    assert hstu_native512.library(8, 8) is None
    assert hstu_native.supports(*(torch.zeros(1, 1, 1, 8),) * 3, None)  # the AVX2 kernel still runs

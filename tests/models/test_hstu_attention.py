"""The tiled HSTU attention must match the reference definition in values and in every gradient."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persrec.models.hstu_attention import hstu_attention, hstu_attention_reference


def _causal_subset_mask(batch: int, length: int, keys: int, generator: torch.Generator) -> torch.Tensor:
    """Random mask that, like every mask the models build, never lets a query see a later token."""
    offset = keys - length
    allowed = torch.arange(keys)[None, :] <= torch.arange(length)[:, None] + offset
    random = torch.rand(batch, length, keys, generator=generator) < 0.7
    return allowed & random


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    length=st.integers(1, 40),
    cached=st.integers(0, 12),
    head_dim=st.integers(1, 6),
    with_bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_tiled_matches_reference(batch, heads, length, cached, head_dim, with_bias, seed, monkeypatch):
    import persrec.models.hstu_attention as module

    monkeypatch.setattr(module, "TILE_BYTES", 64 * 8)  # force many small tiles (same value for every example)
    gen = torch.Generator().manual_seed(seed)
    keys = cached + length

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    q, k, v = (
        leaf(batch, heads, length, head_dim),
        leaf(batch, heads, keys, head_dim),
        leaf(batch, heads, keys, 3),
    )
    bias = leaf(batch, length, keys) if with_bias else None
    mask = _causal_subset_mask(batch, length, keys, gen)
    weight = torch.randn(batch, heads, length, 3, generator=gen, dtype=torch.float64)
    results = []
    for impl in ("reference", "tiled"):
        inputs = [t for t in (q, k, v, bias) if t is not None]
        for t in inputs:
            t.grad = None
        out = hstu_attention(q, k, v, mask, bias, 7.0, implementation=impl)
        (out * weight).sum().backward()
        results.append([out.detach().clone()] + [t.grad.clone() for t in inputs])
    for ref, tiled in zip(*results, strict=True):
        torch.testing.assert_close(tiled, ref, rtol=1e-10, atol=1e-10)


def test_masked_keys_contribute_nothing():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None]
    mask[0, 4, 1] = False
    out = hstu_attention_reference(q, k, v, mask, None, 10.0)
    v2 = v.clone()
    v2[:, :, 1] += 100.0
    out2 = hstu_attention_reference(q, k, v2, mask, None, 10.0)
    torch.testing.assert_close(out[:, :, 4], out2[:, :, 4])
    assert not torch.allclose(out[:, :, 3], out2[:, :, 3])

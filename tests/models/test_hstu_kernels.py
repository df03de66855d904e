"""The fast HSTU attention paths (block-sparse tiles, fused C kernel) against the reference definition.

Values and every gradient (q, k, v, bias) must match for arbitrary masks, any tile geometry and cached keys.
The fused kernel computes in float32 (its exp is accurate to ~1.3 ulp), so it is compared with a float64
reference at float32 tolerances; tests of it are skipped where it cannot be built (no compiler, no AVX2).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import persrec.models.hstu_attention as attention
from persrec import native
from persrec.models import BackboneConfig, build_backbone, hstu_native
from persrec.models.experts import ExpertLayout, ExpertSequenceModel
from persrec.models.hstu_attention import hstu_attention, hstu_attention_reference


def _native_available() -> bool:
    probe = torch.zeros(1, 1, 1, 8)
    return hstu_native.supports(probe, probe, probe, None)


needs_native = pytest.mark.skipif(not _native_available(), reason="fused HSTU kernel cannot be built here")


def _inputs(batch, heads, length, cached, dk, dv, with_bias, padded, seed, dtype=torch.float64):
    """Random q, k, v (and bias) and a mask that is causal over the last `length` keys, with random holes,
    optionally hidden padding keys at the start, and now and then a query row that sees nothing."""
    gen = torch.Generator().manual_seed(seed)
    keys = cached + length
    q = torch.randn(batch, heads, length, dk, generator=gen, dtype=dtype)
    k = torch.randn(batch, heads, keys, dk, generator=gen, dtype=dtype)
    v = torch.randn(batch, heads, keys, dv, generator=gen, dtype=dtype)
    bias = torch.randn(batch, length, keys, generator=gen, dtype=dtype) if with_bias else None
    causal = torch.arange(keys)[None, :] <= torch.arange(length)[:, None] + cached
    mask = causal & (torch.rand(batch, length, keys, generator=gen) < 0.8)
    if padded:
        mask[:, :, : keys // 3] = False
    if length > 2:
        mask[0, 1] = False  # a query that sees nothing gets zero output and zero gradients
    weight = torch.randn(batch, heads, length, dv, generator=gen, dtype=dtype)
    return q, k, v, bias, mask, weight


def _run(implementation, q, k, v, bias, mask, weight, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if bias is not None:
        leaves.append(bias.detach().to(dtype).requires_grad_())
    out = hstu_attention(*leaves[:3], mask, leaves[3] if bias is not None else None, 9.0, implementation)
    (out * weight.to(dtype)).sum().backward()
    return [out.detach().double()] + [t.grad.double() for t in leaves]


shapes = {
    "batch": st.integers(1, 3),
    "heads": st.integers(1, 3),
    "length": st.integers(1, 45),
    "cached": st.integers(0, 12),
    "dk": st.integers(1, 9),
    "dv": st.integers(1, 9),
    "with_bias": st.booleans(),
    "padded": st.booleans(),
    "seed": st.integers(0, 10_000),
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tile_bytes=st.sampled_from([64, 2_000, 30_000, 1 << 22]),
    tile_rows=st.sampled_from([1, 5, 32]),
    key_block=st.sampled_from([1, 3, 16]),
    **shapes,
)
def test_tiled_matches_reference_for_every_tile_geometry(
    tile_bytes,
    tile_rows,
    key_block,
    batch,
    heads,
    length,
    cached,
    dk,
    dv,
    with_bias,
    padded,
    seed,
    monkeypatch,
):
    # Large budgets put several sequences in one tile, small ones split rows and sequences; key blocks of 1
    # make every hidden column a skipped or masked strip.
    monkeypatch.setattr(attention, "TILE_BYTES", tile_bytes)
    monkeypatch.setattr(attention, "TILE_ROWS", tile_rows)
    monkeypatch.setattr(attention, "KEY_BLOCK", key_block)
    q, k, v, bias, mask, weight = _inputs(batch, heads, length, cached, dk, dv, with_bias, padded, seed)
    expected = _run("reference", q, k, v, bias, mask, weight, torch.float64)
    actual = _run("tiled", q, k, v, bias, mask, weight, torch.float64)
    for ref, got in zip(expected, actual, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_tiled_skips_key_blocks_the_expert_mask_hides(monkeypatch):
    monkeypatch.setattr(attention, "TILE_BYTES", 2 * 2 * 100 * 4 * 8)  # 8 query rows per tile
    layout = ExpertLayout(96, ((64, 4),))
    mask = layout.slot_tables["mask"][None].expand(2, -1, -1).contiguous()
    causal = torch.ones_like(mask).tril_()

    def computed(plan):
        return sum((t.q1 - t.q0) * (t.k1 - t.k0) for t in plan.tiles)

    plan = attention._build_plan(mask, heads=2, dtype=torch.float32)
    recent = [tile for tile in plan.tiles if tile.q0 >= 68]
    assert recent and all(tile.k0 >= 64 for tile in recent)  # recent items never visit old history blocks
    assert computed(plan) < computed(attention._build_plan(causal, heads=2, dtype=torch.float32))


@needs_native
@settings(max_examples=30, deadline=None)
# A few head widths only: each (dk, dv) pair is a separate compiled kernel.
@given(**{**shapes, "dk": st.sampled_from([1, 5, 8]), "dv": st.sampled_from([3, 8])})
def test_native_matches_reference(batch, heads, length, cached, dk, dv, with_bias, padded, seed):
    q, k, v, bias, mask, weight = _inputs(batch, heads, length, cached, dk, dv, with_bias, padded, seed)
    expected = _run("reference", q, k, v, bias, mask, weight, torch.float64)
    actual = _run("native", q, k, v, bias, mask, weight, torch.float32)
    for ref, got in zip(expected, actual, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5 * max(1.0, ref.abs().max().item()))


@needs_native
def test_native_is_the_cpu_default_for_float32_only(monkeypatch):
    calls = []
    real = hstu_native.native_hstu_attention
    monkeypatch.setattr(hstu_native, "native_hstu_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v, bias, mask, _ = _inputs(2, 2, 10, 3, 8, 8, False, False, 0, dtype=torch.float32)
    hstu_attention(q, k, v, mask, bias, 9.0)
    assert calls == [1]
    hstu_attention(q.double(), k.double(), v.double(), mask, bias, 9.0)  # float64 goes the tiled way
    assert calls == [1]


def test_auto_falls_back_to_tiled_and_native_says_why(monkeypatch):
    monkeypatch.setattr(hstu_native, "supports", lambda *args: False)
    q, k, v, bias, mask, weight = _inputs(2, 2, 10, 3, 8, 8, True, False, 1, dtype=torch.float32)
    expected = _run("reference", q, k, v, bias, mask, weight, torch.float32)
    actual = _run("auto", q, k, v, bias, mask, weight, torch.float32)
    for ref, got in zip(expected, actual, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs float32 CPU tensors"):
        hstu_attention(q, k, v, mask, bias, 9.0, "native")
    with pytest.raises(ValueError, match="expected auto, native, tiled or reference"):
        hstu_attention(q, k, v, mask, bias, 9.0, "fast")


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PERSREC_CACHE_DIR", str(tmp_path))
    hstu_native._library.cache_clear()
    try:
        if native.cpu_has_avx2():
            with pytest.warns(
                RuntimeWarning, match="could not build the fused HSTU attention kernel for 8x8 heads"
            ):
                assert hstu_native._library(8, 8) is None
        q, k, v, bias, mask, weight = _inputs(1, 2, 6, 0, 8, 8, False, False, 2, dtype=torch.float32)
        assert not hstu_native.supports(q, k, v, bias)
        _run("auto", q, k, v, bias, mask, weight, torch.float32)  # the tiled path still runs
    finally:
        hstu_native._library.cache_clear()


@pytest.mark.parametrize("implementation", ["tiled", pytest.param("native", marks=needs_native)])
def test_a_mask_changed_in_place_is_not_served_from_the_cache(implementation):
    q, k, v, bias, mask, _ = _inputs(2, 2, 12, 0, 8, 8, False, False, 3, dtype=torch.float32)
    before = hstu_attention(q, k, v, mask, bias, 9.0, implementation)
    mask[:, :, :6] = False
    after = hstu_attention(q, k, v, mask, bias, 9.0, implementation)
    torch.testing.assert_close(
        after, hstu_attention_reference(q, k, v, mask, bias, 9.0), rtol=1e-5, atol=1e-6
    )
    assert not torch.allclose(before, after)


@needs_native
def test_native_results_do_not_depend_on_the_thread_count():
    q, k, v, bias, mask, weight = _inputs(3, 4, 30, 5, 8, 8, True, True, 4, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run("native", q, k, v, bias, mask, weight, torch.float32)
        torch.set_num_threads(3)
        several = _run("native", q, k, v, bias, mask, weight, torch.float32)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, several, strict=True):
        assert torch.equal(a, b)


@needs_native
def test_expert_model_training_gradients_match_the_reference_path():
    """The authors' setup in miniature: HSTU with expert tokens, float32, one loss, every parameter gradient."""
    layout = ExpertLayout(40, ((30, 3),))
    grads = {}
    for implementation in ("reference", "native"):
        torch.manual_seed(0)
        config = BackboneConfig(
            num_items=50,
            max_positions=layout.length,
            embedding_dim=16,
            num_layers=2,
            num_heads=2,
            dropout=0.0,
            attention_implementation=implementation,
        )
        model = ExpertSequenceModel(build_backbone("HSTU", config), layout)
        ids = torch.randint(1, 51, (3, 40), generator=torch.Generator().manual_seed(1))
        ids[0, :7] = 0  # a left-padded user
        hidden = model.item_hidden_states(ids)
        (hidden * torch.linspace(-1, 1, hidden.numel()).view_as(hidden)).sum().backward()
        grads[implementation] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, ref in grads["reference"].items():
        torch.testing.assert_close(grads["native"][name], ref, rtol=1e-4, atol=1e-5, msg=name)


@needs_native
def test_a_build_without_openmp_splits_the_work_over_python_threads(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSREC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(
        native, "OPENMP_FLAG", "-fno-such-option"
    )  # the OpenMP build fails, the plain one works
    hstu_native._library.cache_clear()
    threads = torch.get_num_threads()
    try:
        assert hstu_native._library(8, 8).openmp is False
        torch.set_num_threads(2)
        q, k, v, bias, mask, weight = _inputs(2, 3, 20, 4, 8, 8, True, True, 5, dtype=torch.float32)
        expected = _run("reference", q, k, v, bias, mask, weight, torch.float64)
        actual = _run("native", q, k, v, bias, mask, weight, torch.float32)
        for ref, got in zip(expected, actual, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5 * max(1.0, ref.abs().max().item()))
    finally:
        torch.set_num_threads(threads)
        hstu_native._library.cache_clear()


@needs_native
def test_the_first_build_says_so_in_one_line(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("PERSREC_CACHE_DIR", str(tmp_path))
    hstu_native._library.cache_clear()
    try:
        capfd.readouterr()
        assert hstu_native._library(8, 8) is not None
        (line,) = capfd.readouterr().err.splitlines()
        assert line.startswith("persrec: compiling the fused HSTU attention kernel for 8x8 heads, once")
        hstu_native._library.cache_clear()
        assert hstu_native._library(8, 8) is not None  # from the cache: silent
        assert capfd.readouterr().err == ""
    finally:
        hstu_native._library.cache_clear()

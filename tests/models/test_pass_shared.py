"""What the layers of one forward pass share is built once per pass, also under `torch.inference_mode`.

The attention kernels' host-side mask summaries and HSTU's relative-bias index are counted per pass with
monkeypatched builders, in training, under no_grad and in inference mode (the serving path), and the outputs
are checked against an independent per-layer computation.
"""

from __future__ import annotations

import pytest
import torch

import persrec.models.hstu as hstu
import persrec.models.hstu_attention as attention
import persrec.models.sasrec as sasrec
from persrec.models import BackboneConfig, build_backbone, hstu_native
from persrec.models.experts import ExpertLayout, ExpertSequenceModel
from persrec.models.hstu_attention import GatheredBias, hstu_attention, hstu_attention_reference
from persrec.models.mask_cache import PassMask

LAYERS = 4


def _native_available() -> bool:
    probe = torch.zeros(1, 1, 1, 8)
    return hstu_native.supports(probe, probe, probe, None)


needs_native = pytest.mark.skipif(not _native_available(), reason="fused HSTU kernel cannot be built here")

# (backbone, attention implementation, module, name of the summary builder the CPU path calls)
PATHS = [
    pytest.param("HSTU", "tiled", attention, "_build_plan", id="hstu-tiled"),
    pytest.param("HSTU", "native", hstu_native, "_build_mask_layout", id="hstu-native", marks=needs_native),
    pytest.param("SASRec", "auto", sasrec, "_block_ranges", id="sasrec-query-blocks"),
]


def _counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _model(backbone: str, implementation: str, length: int, bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"relative_position_bias": bias, "relative_time_bias": bias} if backbone == "HSTU" else {}
    config = BackboneConfig(
        num_items=60,
        max_positions=length,
        embedding_dim=16,
        num_layers=LAYERS,
        num_heads=2,
        dropout=0.0,
        attention_implementation=implementation,
        **extra,
    )
    model = build_backbone(backbone, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_bias" in name:
                p.normal_()
    return model.eval()


def _batch(length: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (batch, length), generator=gen)
    ids[0, :5] = 0  # padding keys: the mask differs per sequence
    times = torch.randint(0, 50_000, (batch, length), generator=gen).cumsum(1)
    return ids, times


@pytest.mark.parametrize(("backbone", "implementation", "module", "builder"), PATHS)
@pytest.mark.parametrize("mode", ["train", "no_grad", "inference_mode"])
def test_mask_summary_is_built_once_per_pass(monkeypatch, backbone, implementation, module, builder, mode):
    length = 80  # above SASRec's query block, so its CPU path splits and needs the summary
    model = _model(backbone, implementation, length)
    ids, times = _batch(length)
    expected = model(ids, times).detach()
    calls = _counting(monkeypatch, module, builder)
    first = None
    for passes in (1, 2):
        if mode == "train":
            model(ids, times).sum().backward()
            out = None
        elif mode == "no_grad":
            with torch.no_grad():
                out = model(ids, times)
        else:
            with torch.inference_mode():
                out = model(ids, times)
        assert len(calls) == passes, f"{len(calls)} summaries after {passes} pass(es) of {LAYERS} layers"
        if out is not None:
            # Without gradients the fused kernel may take its AVX-512 build: equal up to float rounding.
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
            first = out if first is None else first
            assert torch.equal(out, first)  # every pass of one mode gives the same bits


def test_relative_bias_index_is_built_once_per_pass_and_matches_a_per_layer_bias(monkeypatch):
    length = 24
    model = _model("HSTU", "tiled", length).double()
    ids, times = _batch(length)
    calls = _counting(monkeypatch, hstu, "relative_bias_index")
    seen: list[torch.Tensor] = []
    real = attention.hstu_attention

    def recording(q, k, v, mask, bias, normaliser, implementation="auto"):
        dense = bias.dense() if isinstance(bias, GatheredBias) else bias
        seen.append(dense.clone())  # under inference_mode the layers share one bias buffer
        return real(q, k, v, mask, bias, normaliser, implementation)

    monkeypatch.setattr(hstu, "hstu_attention", recording)
    with torch.inference_mode():
        model(ids, times)
    assert len(calls) == 1 and len(seen) == LAYERS
    # The bias every layer got, against the definition computed per layer from positions and times.
    positions = torch.arange(length)
    offset = (positions[None, :] - positions[:, None] + length - 1).clamp(0, 2 * length - 2)
    gap = (times[:, :, None] - times[:, None, :]).abs().clamp(min=1).float()
    bucket = gap.log2().long().clamp(0, model.config.time_buckets)
    for layer, bias in zip(model.layers, seen, strict=True):
        table = layer.relative_bias
        expected = table.position_bias.detach()[offset][None] + table.time_bias.detach()[bucket]
        assert torch.equal(bias, expected)


def test_an_expert_cache_without_timestamps_is_refused_by_the_time_bias():
    layout = ExpertLayout(12, ((8, 2),))
    model = ExpertSequenceModel(_model("HSTU", "tiled", layout.length), layout).eval()
    ids, times = _batch(12)
    with torch.no_grad():
        cache = model.compress(ids[:, :8], times[:, :8])
        cache.timestamps = None
        with pytest.raises(ValueError, match="timestamp for every key"):
            model.predict_hidden(cache, ids[:, 8:], times[:, 8:])


@pytest.mark.parametrize(("backbone", "implementation", "module", "builder"), PATHS)
def test_serving_builds_one_summary_per_request_under_inference_mode(
    monkeypatch, backbone, implementation, module, builder
):
    layout = ExpertLayout(90, ((70, 4),))
    model = ExpertSequenceModel(_model(backbone, implementation, layout.length), layout).eval()
    ids, times = _batch(90)
    with torch.no_grad():
        full = model.item_hidden_states(ids, times)
    calls = _counting(monkeypatch, module, builder)
    with torch.inference_mode():
        cache = model.compress(ids[:, :70], times[:, :70])
        built = len(calls)
        recent = model.predict_hidden(cache, ids[:, 70:], times[:, 70:])
    # SASRec runs a 20-item request as one query block, which needs no summary.
    assert (built, len(calls) - built) == (1, 0 if backbone == "SASRec" else 1)
    torch.testing.assert_close(recent, full[:, 70:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["tiled", pytest.param("native", marks=needs_native)])
def test_an_inference_mask_changed_in_place_gets_a_new_summary(implementation):
    """Inference tensors have no version counter: a bare mask is summarised afresh on every call."""
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        q, k, v = (torch.randn(2, 2, 12, 8, generator=gen) for _ in range(3))
        mask = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 12, 12).clone()
        before = hstu_attention(q, k, v, mask, None, 9.0, implementation)
        mask[:, :, :6] = False
        after = hstu_attention(q, k, v, mask, None, 9.0, implementation)
        torch.testing.assert_close(after, hstu_attention_reference(q, k, v, mask, None, 9.0))
    assert not torch.allclose(before, after)


def test_pass_mask_builds_each_value_once():
    shared = PassMask(torch.ones(1, 2, 2, dtype=torch.bool))
    builds: list[str] = []
    assert shared.derived("a", lambda: builds.append("a") or 1) == 1
    assert shared.derived("a", lambda: builds.append("a") or 2) == 1
    assert shared.derived("b", lambda: builds.append("b") or 3) == 3
    assert builds == ["a", "b"]


@needs_native
def test_native_kernel_reads_a_padded_bias_in_place_and_copies_any_other():
    gen = torch.Generator().manual_seed(2)
    batch, length, keys = 2, 10, 13
    padded = torch.randn(batch, length, hstu_native.padded_keys(keys), generator=gen)
    view = padded[:, :, :keys]
    assert hstu_native._padded_bias(view, padded.shape[2]).data_ptr() == padded.data_ptr()
    plain = view.contiguous()
    copied = hstu_native._padded_bias(plain, padded.shape[2])
    assert copied.data_ptr() != plain.data_ptr() and torch.equal(copied[:, :, :keys], plain)
    q = torch.randn(batch, 2, length, 8, generator=gen)
    k, v = (torch.randn(batch, 2, keys, 8, generator=gen) for _ in range(2))
    mask = torch.rand(batch, length, keys, generator=gen) < 0.7
    padded[:, :, keys:] = 1e30  # hidden columns: whatever finite values sit there must not matter
    out = hstu_native.native_hstu_attention(q, k, v, mask, view, 9.0)
    torch.testing.assert_close(out, hstu_attention_reference(q, k, v, mask, plain, 9.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["tiled", "reference"])
def test_a_bias_gathered_per_tile_gives_the_dense_bias_results(monkeypatch, implementation):
    """Without autograd the tiled path gathers each tile's bias itself: the same outputs, bit for bit, as
    the bias gathered whole (full pass, and the expert cache's compress + predict with uneven tiles)."""
    # small tiles, so tiles start at other rows and key blocks than 0 and the per-tile offsets matter
    monkeypatch.setattr(attention, "TILE_ROWS", 8)
    monkeypatch.setattr(attention, "KEY_BLOCK", 8)
    monkeypatch.setattr(attention, "TILE_BYTES", 8 * 64 * 8)
    layout = ExpertLayout(40, ((24, 2),))
    model = ExpertSequenceModel(_model("HSTU", implementation, layout.length), layout).eval()
    ids, times = _batch(40)
    ids[:3, :7] = 0  # padded rows: a shared index would not apply, every row has its own

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            full = model.item_hidden_states(ids, times)
            cache = model.compress(ids[:, :24], times[:, :24])
            return full, model.predict_hidden(cache, ids[:, 24:], times[:, 24:])

    gathered_types: list[type] = []
    real = attention.hstu_attention

    def recording(q, k, v, mask, bias, normaliser, implementation="auto"):
        gathered_types.append(type(bias))
        return real(q, k, v, mask, bias, normaliser, implementation)

    monkeypatch.setattr(hstu, "hstu_attention", recording)
    lazy = run()
    assert set(gathered_types) == {GatheredBias}
    monkeypatch.setattr(hstu.RelativeBias, "forward", _dense_forward)
    gathered_types.clear()
    dense = run()
    assert set(gathered_types) == {torch.Tensor}
    for a, b in zip(lazy, dense, strict=True):
        assert torch.equal(a, b)


def _dense_forward(self, shared, batch):
    bias = shared.gather(self.table())[:, :, : shared.keys]
    return bias if bias.shape[0] == batch else bias.expand(batch, -1, -1)

"""The relative-bias index: the C kernel and the PyTorch path give the same integers, and both equal the
definition computed from Python integers (exact floor(log2) of the gap, clamped offsets)."""

from __future__ import annotations

import pytest
import torch

from persrec.models import relative_bias
from persrec.models.base import BackboneConfig
from persrec.models.relative_bias import relative_bias_index

needs_kernel = pytest.mark.skipif(
    relative_bias._library() is None, reason="no C compiler or no AVX2: the bias-index kernel is unavailable"
)


def _config(positions: bool, times: bool, max_positions: int = 40, buckets: int = 128) -> BackboneConfig:
    return BackboneConfig(
        num_items=10,
        max_positions=max_positions,
        relative_position_bias=positions,
        relative_time_bias=times,
        time_buckets=buckets,
    )


def _definition(config, qpos, kpos, qt, kt) -> torch.Tensor:
    """The index of every (b, i, j), from Python integers."""
    batch = max(qpos.shape[0], 1 if qt is None else qt.shape[0])
    length, keys = qpos.shape[1], kpos.shape[1]
    out = torch.zeros(batch, length, keys, dtype=torch.int64)
    top, scale = 2 * config.max_positions - 2, config.time_buckets + 1
    for b in range(batch):
        for i in range(length):
            for j in range(keys):
                value = 0
                if config.relative_position_bias:
                    offset = int(kpos[b % kpos.shape[0], j]) - int(qpos[b % qpos.shape[0], i])
                    value = min(max(offset + config.max_positions - 1, 0), top)
                    if config.relative_time_bias:
                        value *= scale
                if config.relative_time_bias:
                    gap = max(abs(int(qt[b, i]) - int(kt[b, j])), 1)
                    value += min(gap.bit_length() - 1, config.time_buckets)
                out[b, i, j] = value
    return out


def _both_paths(monkeypatch, config, qpos, kpos, qt, kt) -> list[torch.Tensor]:
    indices = [relative_bias_index(config, qpos, kpos, qt, kt)]
    monkeypatch.setattr(relative_bias, "_native_index", lambda *args: None)
    indices.append(relative_bias_index(config, qpos, kpos, qt, kt))
    for index in indices:
        assert index.index.dtype == torch.int32 and index.index.shape[2] % 8 == 0
        assert not index.index[:, :, index.keys :].any(), "padding slots read entry 0"
    return [index.index[:, :, : index.keys].long() for index in indices]


def _edge_gaps(count: int, generator: torch.Generator, high_bits: int) -> torch.Tensor:
    """Gaps at and around every power of two up to 2^high_bits, where a float logarithm can round up."""
    powers = torch.tensor([1 << e for e in range(high_bits)], dtype=torch.int64)
    around = torch.cat([powers - 1, powers, powers + 1, torch.tensor([0])])
    return around[torch.randint(0, around.numel(), (count,), generator=generator)]


@pytest.mark.parametrize(
    "positions, times, high_bits",
    [(True, True, 30), (True, True, 62), (False, True, 30), (False, True, 62), (True, False, 0)],
    ids=["both-int32-range", "both-int64-range", "time-int32-range", "time-int64-range", "position-only"],
)
def test_both_paths_equal_the_integer_definition(monkeypatch, positions, times, high_bits):
    gen = torch.Generator().manual_seed(high_bits)
    batch, length, cached = 3, 9, 6
    config = _config(positions, times, max_positions=12, buckets=40)
    qpos = torch.randint(0, 12, (batch, length), generator=gen)
    kpos = torch.cat([torch.randint(0, 12, (batch, cached), generator=gen), qpos], dim=1)
    qt = kt = None
    if times:
        base = torch.randint(0, 1 << max(1, high_bits - 2), (batch, 1), generator=gen)
        kt = base + _edge_gaps(batch * (cached + length), gen, high_bits - 1).view(batch, -1)
        qt = kt[:, cached:] + _edge_gaps(batch * length, gen, high_bits - 2).view(batch, length)
    expected = _definition(config, qpos, kpos, qt, kt)
    for index in _both_paths(monkeypatch, config, qpos, kpos, qt, kt):
        assert torch.equal(index, expected)


def test_shared_positions_give_one_broadcast_row(monkeypatch):
    config = _config(True, False)
    positions = torch.arange(10)[None].expand(4, 10)
    native, plain = _both_paths(monkeypatch, config, positions, positions, None, None)
    assert native.shape[0] == plain.shape[0] == 1
    assert torch.equal(native, plain)
    assert torch.equal(native, _definition(config, positions[:1], positions[:1], None, None))


@needs_kernel
def test_the_kernel_is_used_on_the_cpu_and_does_not_depend_on_the_thread_count(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    config = _config(True, True)
    positions = torch.randint(0, 40, (5, 33), generator=gen)
    times = torch.randint(0, 1 << 40, (5, 33), generator=gen).sort(1).values
    calls = []
    real = relative_bias._native_index
    monkeypatch.setattr(relative_bias, "_native_index", lambda *a: calls.append(1) or real(*a))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(relative_bias_index(config, positions, positions, times, times).index)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3 and all(index is not None for index in results)
    assert all(torch.equal(results[0], other) for other in results[1:])


def test_missing_timestamps_are_refused():
    config = _config(True, True)
    positions = torch.arange(4)[None]
    with pytest.raises(ValueError, match="carries no timestamps"):
        relative_bias_index(config, positions, positions, None, None)
    with pytest.raises(ValueError, match="timestamp for every key"):
        relative_bias_index(config, positions, positions, positions, positions[:, :2])

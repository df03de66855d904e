"""Scratch buffers: reused only without autograd, per thread and per inference mode, never under a cache the
caller keeps."""

from __future__ import annotations

import threading

import torch

from persrec.models import scratch as scratch_module
from persrec.models.base import BackboneConfig
from persrec.models.experts import ExpertLayout, ExpertSequenceModel
from persrec.models.registry import build_backbone
from persrec.models.scratch import scratch


def test_a_slot_is_reused_only_without_autograd():
    scratch_module.release()
    with torch.no_grad():
        first = scratch("test slot", (4, 8), torch.float32, torch.device("cpu"))
        again = scratch("test slot", (2, 8), torch.float32, torch.device("cpu"))
    assert again.data_ptr() == first.data_ptr() and again.shape == (2, 8)
    with torch.enable_grad():
        fresh = scratch("test slot", (4, 8), torch.float32, torch.device("cpu"))
    assert fresh.data_ptr() != first.data_ptr()


def test_slots_are_per_thread_per_mode_and_bounded(monkeypatch):
    scratch_module.release()
    with torch.no_grad():
        mine = scratch("test slot", (16,), torch.float32, torch.device("cpu")).data_ptr()
    theirs = []

    def other_thread():
        with torch.no_grad():
            theirs.append(scratch("test slot", (16,), torch.float32, torch.device("cpu")).data_ptr())

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert theirs[0] != mine
    with torch.inference_mode():
        inference = scratch("test slot", (16,), torch.float32, torch.device("cpu"))
        assert inference.data_ptr() != mine and inference.is_inference()
    with torch.no_grad():
        writable = scratch("test slot", (16,), torch.float32, torch.device("cpu"))
        writable.fill_(1.0)  # a tensor made under inference mode could not be written here
    monkeypatch.setattr(scratch_module, "MAX_SLOT_BYTES", 32)
    with torch.no_grad():
        big = [scratch("test slot", (64,), torch.float32, torch.device("cpu")).data_ptr() for _ in range(2)]
    assert big[0] != mine and big[1] != mine


def test_an_expert_cache_survives_later_passes_that_use_scratch():
    """compress keeps its layers' key/values: the next passes (predict, another compress) must not write
    into them, and running the same user again gives the same states bit for bit."""
    layout = ExpertLayout(20, ((12, 2),))
    config = BackboneConfig(
        num_items=40,
        max_positions=layout.length,
        embedding_dim=16,
        num_layers=3,
        num_heads=2,
        dropout=0.0,
        relative_position_bias=True,
        relative_time_bias=True,
    )
    torch.manual_seed(0)
    model = ExpertSequenceModel(build_backbone("HSTU", config), layout).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 41, (2, 20), generator=gen)
    times = torch.randint(0, 10**6, (2, 20), generator=gen).sort(1).values
    with torch.inference_mode():
        cache = model.compress(ids[:1, :12], times[:1, :12])
        kept = [k.clone() for k in cache.keys] + [v.clone() for v in cache.values]
        first = model.predict_hidden(cache, ids[:1, 12:], times[:1, 12:])
        model.compress(ids[1:, :12], times[1:, :12])  # another user's pass
        model.predict_hidden(model.compress(ids[1:, :12], times[1:, :12]), ids[1:, 12:], times[1:, 12:])
        assert all(torch.equal(a, b) for a, b in zip(kept, cache.keys + cache.values, strict=True))
        assert torch.equal(model.predict_hidden(cache, ids[:1, 12:], times[:1, 12:]), first)
        full = model.item_hidden_states(ids[:1], times[:1])
    assert (full[:, 12:] - first).abs().max() <= 1e-5

"""Hugging Face decoders as backbones: masks honoured exactly, expert cache equal to the full masked pass."""

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

from persrec.hf.tiny import TINY_ARCHITECTURES, build_decoder, decoder_config  # noqa: E402
from persrec.models.base import BackboneConfig, causal_padding_mask  # noqa: E402
from persrec.models.experts import ExpertLayout, ExpertSequenceModel  # noqa: E402
from persrec.models.hf_decoder import HFDecoderBackbone  # noqa: E402
from persrec.models.recommender import ExpertOptions, ExpertRecommender  # noqa: E402

ATTENTIONS = ("sdpa", "eager")


def tiny_backbone(architecture, attention="sdpa", *, positions=64, item_dim=16, num_items=30, dropout=0.0):
    config = BackboneConfig(
        num_items=num_items, max_positions=positions, embedding_dim=item_dim, dropout=dropout
    )
    kv_heads = None if architecture == "gpt2" else 2
    decoder = build_decoder(
        decoder_config(
            architecture, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads, max_positions=64
        ),
        attention,
    )
    return HFDecoderBackbone(config, decoder)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_blocked_keys_do_not_reach_a_query(architecture, attention):
    # Two independent halves: nothing of the first may leak into the second (eager with a boolean mask leaks).
    torch.manual_seed(0)
    backbone = tiny_backbone(architecture, attention).eval()
    inputs = torch.randn(2, 8, backbone.dim)
    half = torch.zeros(8, 8, dtype=torch.bool)
    half[:4, :4] = True
    half[4:, 4:] = True
    mask = (half & causal_padding_mask(torch.ones(2, 8, dtype=torch.bool))).expand(2, -1, -1)
    positions = torch.arange(8).expand(2, -1)
    with torch.no_grad():
        before, _ = backbone.encode(inputs, mask, positions)
        changed = inputs.clone()
        changed[:, :4] += 10 * torch.randn(2, 4, backbone.dim)
        after, _ = backbone.encode(changed, mask, positions)
    assert torch.equal(before[:, 4:], after[:, 4:])
    assert not torch.allclose(before[:, :4], after[:, :4])


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_expert_cache_equals_the_full_masked_pass(architecture, attention):
    torch.manual_seed(1)
    layout = ExpertLayout(window=12, insertions=((4, 2), (8, 1)))
    model = ExpertSequenceModel(
        tiny_backbone(architecture, attention, positions=layout.length), layout
    ).eval()
    ids = torch.randint(1, 31, (3, 12))
    ids[0, :5] = 0  # a short user, left-padded into the history
    with torch.no_grad():
        full = model.item_hidden_states(ids)[:, 8:]
        cache = model.compress(ids[:, :8])
        cached = model.predict_hidden(cache, ids[:, 8:])
        refreshed = model.refresh(model.compress(ids[:, :4], segments=1), ids[:, 4:8])
        from_refresh = model.predict_hidden(refreshed, ids[:, 8:])
        shorter = model.predict_hidden(cache, ids[:, 10:])
        padded = model.predict_hidden(cache, torch.cat([torch.zeros_like(ids[:, 8:10]), ids[:, 10:]], dim=1))
    assert (full - cached).abs().max() <= 1e-5
    assert (from_refresh - cached).abs().max() <= 1e-5
    assert (shorter - padded[:, 2:]).abs().max() <= 1e-5
    # Only the experts are kept: 3 slots per layer, the decoder's key/value heads.
    assert cache.length == 3 and len(cache.keys) == 2


def test_history_reaches_recent_items_only_through_the_experts():
    torch.manual_seed(2)
    layout = ExpertLayout(window=10, insertions=((6, 2),))
    model = ExpertSequenceModel(tiny_backbone("llama", positions=layout.length), layout).eval()
    ids = torch.randint(1, 31, (1, 10))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] % 30) + 1
    with torch.no_grad():
        cache, other = model.compress(ids[:, :6]), model.compress(changed[:, :6])
        # Recent items see the experts' keys/values and nothing else of the history.
        same_cache = model.predict_hidden(cache, ids[:, 6:])
        assert (model.item_hidden_states(ids)[:, 6:] - same_cache).abs().max() <= 1e-5
        # A history item changes the recent states (through the experts), and the full pass agrees.
        assert not torch.allclose(model.predict_hidden(other, ids[:, 6:]), same_cache)
        assert (
            model.item_hidden_states(changed)[:, 6:] - model.predict_hidden(other, ids[:, 6:])
        ).abs().max() <= 1e-5


def test_training_reaches_experts_items_and_decoder():
    torch.manual_seed(3)
    layout = ExpertLayout(window=10, insertions=((6, 2),))
    model = ExpertSequenceModel(tiny_backbone("qwen2", positions=layout.length, dropout=0.1), layout)
    recommender = ExpertRecommender(model, ExpertOptions(item_dropout=0.2))
    ids = torch.randint(1, 31, (4, 11))
    hidden, targets = recommender.training_outputs({"input_ids": ids[:, :-1], "target_ids": ids[:, 1:]})
    items = recommender.embed_items(targets.clamp(min=0))
    (hidden * items).sum().backward()
    assert model.experts.shared.grad.abs().sum() > 0
    assert model.backbone.item_embedding.weight.grad.abs().sum() > 0
    assert model.backbone.item_projection.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.backbone.decoder.layers[0].parameters())


def test_the_token_table_is_not_carried():
    backbone = tiny_backbone("llama")
    assert backbone.decoder.get_input_embeddings().weight.shape == (1, 32)
    assert backbone.all_item_embeddings().shape == (31, 32)  # item vectors projected to the decoder width


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    backbone = tiny_backbone("llama").train()
    ids = torch.randint(1, 31, (2, 9))

    def gradients():
        backbone.zero_grad()
        backbone(ids).square().sum().backward()
        return [p.grad.clone() for p in backbone.decoder.parameters() if p.grad is not None]

    plain = gradients()
    backbone.set_gradient_checkpointing(True)
    assert backbone.decoder.is_gradient_checkpointing
    checkpointed = gradients()
    backbone.set_gradient_checkpointing(False)
    assert not backbone.decoder.is_gradient_checkpointing
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))
    assert len(backbone.shardable_layers()) == 2


def test_too_few_decoder_positions_is_an_error():
    with pytest.raises(ValueError, match="encodes 64 positions"):
        tiny_backbone("gpt2", positions=100)

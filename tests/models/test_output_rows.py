"""`output_rows`: the last layer computes only the rows a caller reads (evaluation and serving read the last
item's state), and those rows equal the full pass's."""

from __future__ import annotations

import torch

from persrec.models import hstu_native
from persrec.models.base import BackboneConfig
from persrec.models.experts import ExpertLayout, ExpertSequenceModel
from persrec.models.registry import build_backbone


def test_output_rows_give_the_last_rows_of_the_full_pass():
    """The last layer skips the other rows' queries; states, and the key/values it returns, are unchanged."""
    config = BackboneConfig(
        num_items=40,
        max_positions=24,
        embedding_dim=16,
        num_layers=3,
        num_heads=2,
        dropout=0.0,
        relative_position_bias=True,
        relative_time_bias=True,
    )
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 41, (3, 24), generator=gen)
    ids[0, :5] = 0  # a left-padded user
    times = torch.randint(0, 10**6, (3, 24), generator=gen).sort(1).values
    probe = torch.zeros(1, 1, 1, 8)
    native = ["native"] if hstu_native.supports(probe, probe, probe, None) else []  # needs a C compiler
    for implementation in ["reference", "tiled", "auto", *native]:
        torch.manual_seed(0)
        backbone = build_backbone(
            "HSTU", BackboneConfig(**{**config.__dict__, "attention_implementation": implementation})
        )
        backbone.eval()
        with torch.inference_mode():
            full = backbone(ids, times)
            for rows in (1, 4, 24):
                tail = backbone(ids, times, output_rows=rows)
                assert tail.shape == (3, rows, 16)
                torch.testing.assert_close(tail, full[:, -rows:], rtol=1e-5, atol=1e-6)
    layout = ExpertLayout(20, ((12, 2),))
    torch.manual_seed(0)
    model = ExpertSequenceModel(
        build_backbone("HSTU", BackboneConfig(**{**config.__dict__, "max_positions": layout.length})), layout
    ).eval()
    with torch.inference_mode():
        cache = model.compress(ids[:, :12], times[:, :12])
        every = model.predict_hidden(cache, ids[:, 12:20], times[:, 12:20])
        last = model.predict_hidden(cache, ids[:, 12:20], times[:, 12:20], output_rows=3)
    torch.testing.assert_close(last, every[:, -3:], rtol=1e-5, atol=1e-6)

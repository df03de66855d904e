"""Sharded training across processes: FSDP on two processes against one process on the same global batch, the
whole `persrec train` path under FSDP (equal to DDP, killed and resumed exactly, loadable by one process), and
DeepSpeed ZeRO-2 in one process (needs the `deepspeed` extra, which the `test` extra does not install)."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persrec.train.distributed import DistributedContext
from persrec.train.strategy import TrainingStrategy
from tests.conftest import torchrun_command

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# ---- FSDP on 2 processes == 1 process on the same global batch ------------------------------------------
# The loss is a full softmax over the catalogue, summed over each rank's positions and divided by the number
# of positions in the *global* batch (times the world size, since ranks' gradients are averaged): each rank's
# share of the one-process loss. Dropout is off (ranks draw different masks by design).
COMMON = textwrap.dedent(
    """
    import torch
    from torch import nn
    from persrec.config import load_config
    from persrec.train.build import build_model
    from persrec.train.schedule import build_optimizer

    MODELS = {
        "SASRec": {"model": "SASRec"},
        "PersonalizedHSTU": {"model": "PersonalizedHSTU", "number_of_user_tokens": 2,
                             "pretrain_item_num": 10, "recent_item_num": 6, "relative_position_bias": True},
    }

    class GlobalSoftmax(nn.Module):
        def __init__(self, world, positions):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(5.0))  # a loss parameter: sharded with the model
            self.world, self.positions = world, positions

        def forward(self, queries, targets, embed_items, generator=None, sequence_length=None):
            keep = targets > 0
            items = embed_items(torch.arange(41))
            logits = self.scale * nn.functional.normalize(queries[keep], dim=-1) @ nn.functional.normalize(items, dim=-1).T
            loss = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
            return type("Output", (), {"loss": loss * self.world / self.positions})()

    def setup(name, world, positions, **extra):
        overrides = {"MAX_ITEM_LIST_LENGTH": 16, "n_layers": 2, "n_heads": 2, "item_embedding_size": 16,
                     "hidden_dropout_prob": 0.0, "optim_args.max_grad_norm": 0.5, **MODELS[name], **extra}
        config = load_config(overrides=overrides)
        torch.manual_seed(0)
        return config, build_model(config, num_items=40), GlobalSoftmax(world, positions)

    def batches():
        generator = torch.Generator().manual_seed(5)
        for _ in range(3):
            ids = torch.randint(1, 41, (8, 16), generator=generator)
            ids[::3, :4] = 0
            targets = torch.roll(ids, -1, 1).masked_fill(ids == 0, 0)
            yield {"input_ids": ids, "target_ids": targets}

    def train(strategy, config, model, loss, rank=0, world=1):
        strategy.prepare(model, loss)
        optimizer, scheduler = build_optimizer(strategy.parameters(), config.optim_args, 3)
        strategy.attach(optimizer, scheduler)
        for batch in batches():
            strategy.train_step({k: v[rank::world] for k, v in batch.items()}, None)
        return strategy.model_state(), strategy.loss_state()

    def positions():
        return int(sum((b["target_ids"] > 0).sum() for b in batches()) / 3)
    """
)

FSDP_WORKER = COMMON + textwrap.dedent(
    """
    import sys
    from safetensors.torch import save_file
    from persrec.train.distributed import setup_distributed, teardown_distributed
    from persrec.train.strategy import FSDPStrategy

    ctx = setup_distributed("cpu")
    for name in MODELS:
        config, model, loss = setup(name, ctx.world_size, positions(), strategy="fsdp", gradient_checkpointing=True)
        weights, loss_state = train(FSDPStrategy(config, ctx), config, model, loss, ctx.rank, ctx.world_size)
        if ctx.rank == 0:
            save_file({**weights, "loss.scale": loss_state["scale"]}, f"{sys.argv[1]}/{name}.safetensors")
    teardown_distributed()
    """
)


def _one_process(name: str) -> dict[str, torch.Tensor]:
    namespace: dict = {}
    exec(compile(COMMON, "common", "exec"), namespace)  # the same definitions as the workers
    # every batch has the same number of positions here, so the per-batch normaliser is one number
    config, model, loss = namespace["setup"](name, 1, namespace["positions"]())
    weights, loss_state = namespace["train"](
        TrainingStrategy(config, DistributedContext()), config, model, loss
    )
    return {**weights, "loss.scale": loss_state["scale"]}


@pytest.mark.slow
def test_fsdp_on_two_processes_equals_one_process_on_the_same_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    completed = subprocess.run(
        [*torchrun_command(2), str(script), str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    for name in ("SASRec", "PersonalizedHSTU"):
        sharded = load_file(str(tmp_path / f"{name}.safetensors"))
        single = _one_process(name)
        assert sharded.keys() == single.keys()
        for key in [k for k in single if k.endswith("qkv.bias")]:
            # SASRec's key bias adds the same logit to a whole softmax row: its gradient is zero up to
            # rounding, and Adam turns rounding noise (different summation orders) into full-size steps.
            sharded[key], single[key] = (torch.cat([t[:16], t[32:]]) for t in (sharded[key], single[key]))
        worst = max((sharded[k] - single[k]).abs().max().item() for k in single)
        assert worst <= 1e-6, (name, worst)
        assert not torch.equal(single["loss.scale"], torch.tensor(5.0))  # the loss parameter trained too

"""Sharded training across processes: FSDP on two processes against one process on the same global batch, the
whole `persrec train` path under FSDP (equal to DDP, killed and resumed exactly, loadable by one process), and
DeepSpeed ZeRO-2 in one process (needs the `deepspeed` extra, which the `test` extra does not install)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persrec.cli import main
from persrec.config import load_config
from persrec.train import checkpoint as ckpt
from persrec.train.distributed import DistributedContext
from persrec.train.strategy import TrainingStrategy
from persrec.train.trainer import Trainer
from tests.conftest import cli_flags, tiny_overrides, torchrun_command
from tests.train.test_resume import _kill_after_step, _torchrun

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
        # a Hugging Face decoder (tiny Llama, random weights): its blocks come from `shardable_layers`
        "PersonalizedLLaMAID": {"model": "PersonalizedLLaMAID", "number_of_user_tokens": 2,
                                "pretrain_item_num": 10, "recent_item_num": 6},
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

    def setup(name, world, positions, model_dir, **extra):
        if "LLaMAID" in name:
            from persrec.hf.tiny import decoder_config

            decoder_config("llama", hidden_size=16, num_layers=2, num_heads=2, max_positions=32).save_pretrained(model_dir)
            extra = {**extra, "user_pretrain_dir": model_dir}
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
        model_dir = f"{sys.argv[1]}/{name}-rank{ctx.rank}"
        config, model, loss = setup(
            name, ctx.world_size, positions(), model_dir, strategy="fsdp", gradient_checkpointing=True
        )
        weights, loss_state = train(FSDPStrategy(config, ctx), config, model, loss, ctx.rank, ctx.world_size)
        if ctx.rank == 0:
            save_file({**weights, "loss.scale": loss_state["scale"]}, f"{sys.argv[1]}/{name}.safetensors")
    teardown_distributed()
    """
)


def _one_process(name: str, model_dir: Path) -> dict[str, torch.Tensor]:
    namespace: dict = {}
    exec(compile(COMMON, "common", "exec"), namespace)  # the same definitions as the workers
    # every batch has the same number of positions here, so the per-batch normaliser is one number
    config, model, loss = namespace["setup"](name, 1, namespace["positions"](), str(model_dir))
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
    for name in ("SASRec", "PersonalizedHSTU", "PersonalizedLLaMAID"):
        sharded = load_file(str(tmp_path / f"{name}.safetensors"))
        single = _one_process(name, tmp_path / f"{name}-single")
        assert sharded.keys() == single.keys()
        for key in [k for k in single if k.endswith("qkv.bias")]:
            # SASRec's key bias adds the same logit to a whole softmax row: its gradient is zero up to
            # rounding, and Adam turns rounding noise (different summation orders) into full-size steps.
            sharded[key], single[key] = (torch.cat([t[:16], t[32:]]) for t in (sharded[key], single[key]))
        worst = max((sharded[k] - single[k]).abs().max().item() for k in single)
        assert worst <= 1e-6, (name, worst)
        assert not torch.equal(single["loss.scale"], torch.tensor(5.0))  # the loss parameter trained too


# ---- persrec train --strategy fsdp on two processes ------------------------------------------------------
# fix_temp false: the loss has a (0-d) parameter too, which FSDP keeps replicated and DDP leaves outside its module
RUN = dict(max_steps=24, epochs=40, save_every_steps=1, hidden_dropout_prob=0.3, n_layers=2, fix_temp=False)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run) / "model.safetensors"))


def _finish(process: subprocess.Popen) -> None:
    assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]


@pytest.mark.slow
def test_fsdp_training_equals_ddp_resumes_exactly_and_loads_in_one_process(tiny_dataset, tmp_path, capsys):
    runs = {name: tiny_overrides(tiny_dataset, tmp_path / name, **RUN) for name in ("ddp", "fsdp", "killed")}
    _finish(_torchrun(cli_flags({**runs["ddp"], "strategy": "ddp"})))
    _finish(_torchrun(cli_flags({**runs["fsdp"], "strategy": "fsdp"})))
    ddp, fsdp = _weights(tmp_path / "ddp" / "run"), _weights(tmp_path / "fsdp" / "run")
    assert ddp.keys() == fsdp.keys()
    assert max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp) <= 1e-6  # 24 steps, dropout on

    # killed mid-run (SIGKILL to launcher and workers), then resumed: bit-for-bit the uninterrupted run
    killed = {**runs["killed"], "strategy": "fsdp"}
    run = tmp_path / "killed" / "run"
    process = _torchrun(cli_flags(killed))
    _kill_after_step(run, 7, process, before=24)
    _finish(_torchrun(cli_flags({**killed, "resume": "true"})))
    resumed = _weights(run)
    for key in fsdp:
        assert torch.equal(resumed[key], fsdp[key]), key

    # one process reads the sharded run: evaluation reproduces its test metrics
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "fsdp" / "run"), "--show_progress", "false"]) == 0
    recorded = json.loads((tmp_path / "fsdp" / "run" / "results.json").read_text())["test"]
    assert f"{recorded['ndcg@10']:.4f}" in capsys.readouterr().out


# ---- DeepSpeed ZeRO-2 and 3, one process ----------------------------------------------------------------------
DEEPSPEED_MISSING = importlib.util.find_spec("deepspeed") is None
DEEPSPEED_RUN = dict(max_steps=8, hidden_dropout_prob=0.3, n_layers=2, popularity_baseline="false")
# ZeRO 3 with a learned temperature (a 0-d parameter: see deepspeed_strategy.ScalarParameter) and without
# clipping: DeepSpeed's clipping takes the norm over every trained parameter, DDP and FSDP over the model's only.
TEMPERATURE = {"fix_temp": False, "optim_args.max_grad_norm": 0.0}
STAGE_EXTRA = {2: {}, 3: TEMPERATURE}

DEEPSPEED_WORKER = textwrap.dedent(
    """
    import json, sys
    import pytest
    from persrec.train.distributed import teardown_distributed
    from tests.train.test_strategy import _trained

    dataset, root, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    _trained(dataset, f"{root}/straight", **settings)
    _trained(dataset, f"{root}/killed", killed_at=4, save_every_steps=4, **settings)
    _trained(dataset, f"{root}/killed", resume=True, save_every_steps=4, **settings)
    teardown_distributed()
    """
)


@pytest.mark.slow
@pytest.mark.skipif(
    DEEPSPEED_MISSING,
    reason="deepspeed is not installed (pip install 'persrec[deepspeed]'); the test extra leaves it out: "
    "its first run compiles an op for about 90 s",
)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_in_one_process_trains_the_plain_model_and_resumes_exactly(
    tiny_dataset, tmp_path, stage
):
    extra = STAGE_EXTRA[stage]
    settings = {
        **DEEPSPEED_RUN,
        **extra,
        "strategy": "deepspeed",
        "stage": stage,
        "gradient_checkpointing": stage == 3,
    }
    script = tmp_path / "worker.py"
    script.write_text(DEEPSPEED_WORKER)
    completed = subprocess.run(
        [sys.executable, str(script), str(tiny_dataset), str(tmp_path), json.dumps(settings)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    plain = Trainer(
        load_config(overrides=tiny_overrides(tiny_dataset, tmp_path / "plain", **DEEPSPEED_RUN, **extra)),
        DistributedContext(),
    )
    plain.fit()
    straight, theirs = _weights(tmp_path / "straight" / "run"), _weights(tmp_path / "plain" / "run")
    assert max((straight[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-6
    resumed = _weights(tmp_path / "killed" / "run")
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    # the ZeRO checkpoint is a plain one: one process without deepspeed resumes from it
    latest = ckpt.latest_checkpoint(tmp_path / "straight" / "run")
    config = ckpt.load_checkpoint_config(latest).replace(strategy="ddp", max_steps=9)
    continued = Trainer(config, DistributedContext(), latest)
    assert continued.state.global_step == 8
    for name, tensor in continued.model.state_dict().items():
        assert torch.equal(tensor, straight[name]), name


@pytest.mark.slow
@pytest.mark.skipif(DEEPSPEED_MISSING, reason="deepspeed is not installed (pip install 'persrec[deepspeed]')")
def test_deepspeed_on_two_processes_equals_ddp(tiny_dataset, tmp_path):
    for stage in (2, 3):
        weights = {}
        for strategy in ("ddp", "deepspeed"):
            common = {
                **DEEPSPEED_RUN,
                **STAGE_EXTRA[stage],
                "max_steps": 6,
                "strategy": strategy,
                "stage": stage,
            }
            overrides = tiny_overrides(tiny_dataset, tmp_path / f"{strategy}{stage}", **common)
            _finish(_torchrun(cli_flags(overrides)))
            weights[strategy] = _weights(tmp_path / f"{strategy}{stage}" / "run")
        ours, reference = weights["deepspeed"], weights["ddp"]
        assert max((ours[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6, stage

"""Training strategies in one process: precision selection, DeepSpeed settings, and FSDP in a world of one
(same model as a plain run, checkpoints in the plain format, exact resume). Two-process runs and DeepSpeed
training are in test_sharded_training.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from persrec.config import ConfigError, config_keys, load_config
from persrec.train import checkpoint as ckpt
from persrec.train.build import build_model
from persrec.train.deepspeed_config import deepspeed_config
from persrec.train.distributed import DistributedContext, teardown_distributed
from persrec.train.resume import training_config
from persrec.train.schedule import build_optimizer
from persrec.train.strategy import (
    autocast_for,
    indexed_optimizer_state,
    named_optimizer_state,
    resolve_precision,
)
from persrec.train.trainer import Trainer
from tests.conftest import tiny_overrides

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_precision_auto_is_bf16_only_on_a_cuda_device_that_supports_it():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", CUDA, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", CUDA, bf16_supported=False) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", CUDA) == "fp32"
    assert autocast_for("auto", CPU) is None
    autocast = autocast_for("bf16", CPU)
    assert autocast is not None and autocast.fast_dtype == torch.bfloat16 and autocast.device == "cpu"
    with pytest.raises(ConfigError, match="--precision"):
        resolve_precision("fp16", CPU)


def test_bf16_training_runs_on_cpu(tiny_dataset, tmp_path):
    trainer = Trainer(
        load_config(overrides=tiny_overrides(tiny_dataset, tmp_path, precision="bf16")), DistributedContext()
    )
    assert trainer.autocast is not None
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss = trainer._step(next(iter(trainer.loader)))
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(v.dtype == torch.float32 for v in trainer.model.state_dict().values())  # weights stay fp32


def test_scale_options_are_real_keys_now():
    for key in ("strategy", "stage", "gradient_checkpointing"):
        assert key in config_keys()
    config = load_config(overrides={"strategy": "fsdp", "stage": "3", "gradient_checkpointing": "true"})
    assert (config.strategy, config.stage, config.gradient_checkpointing) == ("fsdp", 3, True)


def test_deepspeed_settings_follow_persrec_options(tmp_path):
    config = load_config(
        overrides={"stage": 3, "train_batch_size": 6, "optim_args.max_grad_norm": 0.5, "precision": "bf16"}
    )
    built = deepspeed_config(config, world_size=4, bf16=True)
    assert built["zero_optimization"] == {"stage": 3}
    assert built["train_batch_size"] == 24 and built["train_micro_batch_size_per_gpu"] == 6
    assert built["gradient_clipping"] == 0.5 and built["bf16"] == {"enabled": True}
    extra = tmp_path / "ds.yaml"
    extra.write_text("zero_optimization:\n  overlap_comm: true\n  stage: 2\ncommunication_data_type: fp32\n")
    merged = deepspeed_config(config.replace(deepspeed_config=str(extra)), world_size=1, bf16=False)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["communication_data_type"] == "fp32" and merged["bf16"] == {"enabled": False}
    extra.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer' is set by persrec from --optim_args"):
        deepspeed_config(config.replace(deepspeed_config=str(extra)), world_size=1, bf16=False)


def test_optimizer_state_by_name_and_by_index_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    optimizer, _ = build_optimizer(list(model.parameters()), load_config().optim_args, 10)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    plain = optimizer.state_dict()
    names = [name for name, _ in model.named_parameters()]
    by_name = named_optimizer_state(plain, names)
    assert list(by_name["state"]) == names and by_name["param_groups"][0]["params"] == names
    back = indexed_optimizer_state(by_name, names)
    assert back["param_groups"] == plain["param_groups"]
    for index, values in plain["state"].items():
        for key, tensor in values.items():
            assert torch.equal(back["state"][index][key], tensor)


@pytest.fixture
def world_of_one():
    """FSDP needs a process group even in one process; the strategy creates one and this test ends it."""
    yield
    teardown_distributed()


class _Killed(Exception):
    pass


def _trained(dataset, run_dir, resume: bool = False, killed_at: int = 0, **extra) -> Trainer:
    """A finished run, or with `killed_at` one that dies right after its periodic save at that step."""
    settings = {"n_layers": 2, "hidden_dropout_prob": 0.3, "max_steps": 5, **extra}
    overrides = tiny_overrides(dataset, run_dir, **settings)
    if resume:
        config, checkpoint = training_config([], {**overrides, "resume": "true"})
    else:
        config, checkpoint = load_config(overrides=overrides), None
    trainer = Trainer(config, DistributedContext(), checkpoint)
    if killed_at:

        def die_after_save() -> None:
            if trainer.state.global_step == killed_at:
                raise _Killed

        trainer._check_stop = die_after_save
        with pytest.raises(_Killed):
            trainer.fit()
        return trainer
    trainer.fit()
    return trainer


def _latest(trainer: Trainer) -> dict[str, torch.Tensor]:
    return ckpt.read_weights(ckpt.latest_checkpoint(trainer.run_dir) / "model.safetensors")


def test_fsdp_in_one_process_trains_the_plain_model(tiny_dataset, tmp_path, world_of_one):
    plain = _trained(tiny_dataset, tmp_path / "plain")
    sharded = _trained(tiny_dataset, tmp_path / "fsdp", strategy="fsdp", gradient_checkpointing=True)
    # with a learned (0-d, so unsharded) temperature as well
    plain_temperature = _trained(tiny_dataset, tmp_path / "plain-t", fix_temp=False)
    sharded_temperature = _trained(tiny_dataset, tmp_path / "fsdp-t", strategy="fsdp", fix_temp=False)
    for key, value in _latest(plain_temperature).items():
        torch.testing.assert_close(_latest(sharded_temperature)[key], value, rtol=0, atol=1e-6, msg=key)
    temperatures = [
        plain_temperature.loss.state_dict()["log_inv_temperature"],
        sharded_temperature.strategy.loss_state()["log_inv_temperature"],
    ]
    assert temperatures[0].shape == temperatures[1].shape == ()
    assert not torch.equal(temperatures[0], torch.tensor(math.log(1 / 0.05)))  # it trained
    torch.testing.assert_close(temperatures[1], temperatures[0], rtol=0, atol=1e-6)
    assert type(sharded.strategy).__name__ == "FSDPStrategy"
    assert any(type(p).__name__ == "DTensor" for p in sharded.model.parameters())
    ours, theirs = _latest(sharded), _latest(plain)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    summaries = [json.loads((t.run_dir / "results.json").read_text()) for t in (sharded, plain)]
    assert summaries[0]["parameters"] == summaries[1]["parameters"]  # counted in full, not per shard
    assert sharded.state.history[-1]["valid/ndcg@10"] == pytest.approx(
        plain.state.history[-1]["valid/ndcg@10"], abs=1e-6
    )


def test_an_fsdp_checkpoint_is_a_plain_checkpoint(tiny_dataset, tmp_path, world_of_one):
    sharded = _trained(tiny_dataset, tmp_path, strategy="fsdp")
    latest = ckpt.latest_checkpoint(sharded.run_dir)
    config = ckpt.load_checkpoint_config(latest)
    model = build_model(config, sharded.store.num_items, sharded.store.num_users)
    ckpt.load_weights(model, latest / "model.safetensors")
    optimizer, _ = build_optimizer(list(model.parameters()), config.optim_args, 5)
    saved = ckpt.load_optimizer_state(latest, CPU)["optimizer"]
    optimizer.load_state_dict(saved)  # the plain optimizer takes it as its own
    assert len(saved["state"]) == len(list(model.parameters()))
    for parameter, values in zip(model.parameters(), saved["state"].values(), strict=True):
        assert values["exp_avg"].shape == parameter.shape and float(values["step"]) == 5
    # and the plain run resumes from it: its weights and moments are the sharded run's
    resumed = Trainer(config.replace(strategy="ddp", max_steps=6), DistributedContext(), latest)
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])


def test_fsdp_resume_is_bit_for_bit(tiny_dataset, tmp_path, world_of_one):
    straight = _trained(tiny_dataset, tmp_path / "a", strategy="fsdp", max_steps=8)
    _trained(tiny_dataset, tmp_path / "b", strategy="fsdp", max_steps=8, save_every_steps=4, killed_at=4)
    resumed = _trained(tiny_dataset, tmp_path / "b", resume=True, strategy="fsdp", max_steps=8)
    assert resumed.state.global_step == straight.state.global_step == 8
    ours, theirs = _latest(resumed), _latest(straight)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    a, b = (
        ckpt.load_optimizer_state(ckpt.latest_checkpoint(t.run_dir), CPU)["optimizer"]
        for t in (resumed, straight)
    )
    for index in a["state"]:
        assert torch.equal(a["state"][index]["exp_avg_sq"], b["state"][index]["exp_avg_sq"])


def test_fsdp_trains_hllm_with_a_trainable_item_llm_as_the_plain_run(tiny_dataset, tmp_path, world_of_one):
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    from tests.hf.test_hllm import hllm_overrides
    from tests.hf.tiny_models import tiny_llama_dir

    item_model = tiny_llama_dir(tmp_path / "item-llama")
    settings = hllm_overrides(
        tiny_dataset, tmp_path, item_model, item_llm_trainable=True
    )  # learned temperature
    for key in ("dataset", "checkpoint_dir", "run_name", "epochs", "show_progress", "topk"):
        settings.pop(key)
    plain = _trained(tiny_dataset, tmp_path / "plain", max_steps=3, **settings)
    sharded = _trained(
        tiny_dataset, tmp_path / "fsdp", max_steps=3, strategy="fsdp", gradient_checkpointing=True, **settings
    )
    item_llm = sharded.model.backbone.item_encoder.llm
    blocks = sharded.model.backbone.shardable_layers()
    user_blocks = sharded.model.backbone.decoder.config.num_hidden_layers
    assert len(blocks) == user_blocks + 2  # the user decoder's blocks, then the item LLM's 2
    assert all(any(block is layer for block in blocks) for layer in item_llm.layers)
    assert all(type(p).__name__ == "DTensor" for p in item_llm.parameters())  # the item LLM is sharded too
    flag = "is_activation_checkpointing" if hasattr(item_llm, "is_activation_checkpointing") else None
    assert getattr(item_llm, flag or "is_gradient_checkpointing")
    ours, theirs = _latest(sharded), _latest(plain)
    assert any("item_encoder" in key for key in ours)  # the item LLM trained and was saved
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


def test_a_0d_parameter_reaches_deepspeed_as_a_1_element_one_with_the_same_gradient(
    tiny_dataset, tmp_path, world_of_one
):
    from persrec.train.deepspeed_strategy import DeepSpeedStrategy

    trainer = Trainer(
        load_config(
            overrides=tiny_overrides(tiny_dataset, tmp_path, fix_temp=False, hidden_dropout_prob=0.0)
        ),
        DistributedContext(),
    )
    batch = next(iter(trainer.loader))
    plain = trainer.loss.log_inv_temperature
    queries, targets = trainer.model(batch)  # the plain gradient of one step
    length = batch["input_ids"].shape[1]
    generator = torch.Generator().manual_seed(3)
    trainer.loss(
        queries, targets, trainer.model.embed_items, generator=generator, sequence_length=length
    ).loss.backward()
    expected = plain.grad.clone()

    strategy = DeepSpeedStrategy(trainer.config, DistributedContext())
    strategy.prepare(trainer.model, trainer.loss)  # no deepspeed needed before `attach`
    names = [name for name, _ in strategy.root.named_parameters()]
    assert "loss.log_inv_temperature" not in names and "loss._zero_log_inv_temperature.value" in names
    held = strategy._by_plain["loss.log_inv_temperature"]
    assert held.shape == (1,) and torch.equal(held.detach().reshape(()), plain.detach())
    trainer.model.zero_grad(set_to_none=True)
    strategy.root(batch, torch.Generator().manual_seed(3)).loss.backward()
    assert trainer.loss.log_inv_temperature.shape == ()  # what the loss reads stays 0-d
    torch.testing.assert_close(held.grad.reshape(()), expected, rtol=0, atol=1e-6)
    assert strategy._saved("loss.log_inv_temperature", held.detach()).shape == ()

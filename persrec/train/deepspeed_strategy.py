"""DeepSpeed ZeRO (stage 2 or 3) behind persrec's strategy interface (the optional `deepspeed` extra).

persrec's own AdamW and schedule stay the client optimizer, so a ZeRO run follows the same update rule as a DDP
or FSDP run. Checkpoints never use DeepSpeed's own (pickled) checkpoint files: weights and optimizer moments
are gathered parameter by parameter with DeepSpeed's public `safe_get_full_*` functions into the
single-process format, and restored with `safe_set_full_*`, so a ZeRO checkpoint loads into a plain run.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from persrec.train.deepspeed_config import deepspeed_config, require_deepspeed
from persrec.train.strategy import FULL_ON_MAIN, ShardedStrategy, check_state, resolve_precision

# AdamW's per-parameter moments; the step count lives once per flat partition in DeepSpeed.
MOMENTS = ("exp_avg", "exp_avg_sq")


def _full_shape(parameter: Tensor) -> tuple[int, ...]:
    """A parameter's shape as the model declares it (ZeRO 3 keeps only a partition in `.shape`)."""
    return tuple(getattr(parameter, "ds_shape", parameter.shape))


class ScalarParameter(nn.Module):
    """A 0-d parameter (the loss's learned temperature) as DeepSpeed can train it.

    DeepSpeed cannot broadcast a 0-d tensor, so the value is a 1-element parameter of this module. Its owner gets a
    fresh 0-d copy before each of its forwards: ZeRO-3 frees a parameter's data once its module's forward returns,
    and an operation that saved the parameter itself for the backward pass (`clamp` does) would then read an
    empty tensor and hand the parameter a zero gradient.
    """

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = nn.Parameter(value.detach().reshape(1).clone(), requires_grad=value.requires_grad)

    def forward(self) -> Tensor:
        return self.value.clone().reshape(())


def _hand_over(owner: nn.Module, name: str, holder: ScalarParameter) -> None:
    def refresh(module: nn.Module, args: Any) -> None:
        module.__dict__[name] = holder()

    owner.register_forward_pre_hook(refresh)


class DeepSpeedStrategy(ShardedStrategy):
    name = "deepspeed"

    def prepare(self, model: nn.Module, loss: nn.Module) -> None:
        """As for FSDP, plus: every 0-d parameter moves into a `ScalarParameter`; state is saved and loaded
        under its own name and shape, as everywhere else."""
        super().prepare(model, loss)
        self._plain: list[
            tuple[str, nn.Parameter]
        ] = []  # (name in a plain model, the parameter DeepSpeed trains)
        self._plain_shapes: dict[str, tuple[int, ...]] = {}
        for full_name, parameter in list(self.root.named_parameters()):
            self._plain_shapes[full_name] = tuple(parameter.shape)
            if parameter.dim() != 0:
                self._plain.append((full_name, parameter))
                continue
            owner_name, _, name = full_name.rpartition(".")
            owner = self.root.get_submodule(owner_name)
            holder = ScalarParameter(parameter)
            del owner._parameters[name]
            owner.add_module(f"_zero_{name}", holder)
            owner.__dict__[name] = parameter.detach().clone()  # read before the first forward, if at all
            _hand_over(owner, name, holder)
            self._plain.append((full_name, holder.value))
        self._by_plain = dict(self._plain)

    def _saved(self, name: str, value: Tensor) -> Tensor:
        return value.reshape(self._plain_shapes[name])

    def attach(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        deepspeed = require_deepspeed()
        bf16 = resolve_precision(self.config.precision, self.ctx.device) == "bf16"
        settings = deepspeed_config(self.config, dist.get_world_size(), bf16)
        os.environ.setdefault("LOCAL_RANK", str(self.ctx.local_rank))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.engine, self.zero, _, _ = deepspeed.initialize(
                model=self.root, optimizer=optimizer, config=settings, dist_init_required=False
            )
        self.optimizer, self.scheduler = optimizer, scheduler

    def train_step(self, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        with self.autocast or contextlib.nullcontext():
            output = self.engine(batch, generator)
        self.engine.backward(output.loss)
        self.engine.step()  # clips (gradient_clipping), steps the optimizer, zeroes the gradients
        self.scheduler.step()
        return output.loss.detach().float()

    # ---- state in the single-process format --------------------------------------------------------------
    def full_state(self, where: str) -> dict[str, Tensor]:
        """fp32 master weights (ZeRO keeps them in the optimizer) and buffers; every rank takes part."""
        from deepspeed.utils import safe_get_full_fp32_param

        state: dict[str, Tensor] = {}
        for name, parameter in self._plain:
            value = self._saved(name, safe_get_full_fp32_param(parameter).detach())
            state[name] = value.cpu().clone() if where == FULL_ON_MAIN else value.clone()
        trained = {name for name, _ in self.root.named_parameters()}
        for name, value in self.root.state_dict().items():  # persistent buffers
            if name not in trained:
                state[name] = value.detach().cpu().clone()
        return state

    def _step_count(self) -> Tensor:
        inner = getattr(self.zero, "optimizer", self.zero)
        for values in inner.state.values():
            if "step" in values:
                return torch.as_tensor(values["step"], dtype=torch.float32).detach().cpu().clone()
        return torch.tensor(0.0)

    def optimizer_state(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        step = self._step_count()
        state: dict[int, dict[str, Tensor]] = {}
        for index, (name, parameter) in enumerate(self._plain):
            moments = {key: safe_get_full_optimizer_state(parameter, key) for key in MOMENTS}
            if any(value is None for value in moments.values()):
                continue  # no step taken yet
            saved = {k: self._saved(name, v.detach()).cpu().clone() for k, v in moments.items()}
            state[index] = {"step": step.clone(), **saved}
        (group,) = self.optimizer.param_groups
        hyper = {k: v for k, v in group.items() if k != "params"}
        return {"state": state, "param_groups": [{**hyper, "params": list(range(len(self._plain)))}]}

    def _set_parameters(self, values: dict[str, Tensor]) -> None:
        """Both the fp32 master copy and the (possibly bf16, possibly partitioned) module parameter."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        chosen = [(p, values[name]) for name, p in self._plain if name in values]
        parameters = [p for p, _ in chosen]
        with torch.no_grad(), deepspeed.zero.GatheredParameters(parameters, modifier_rank=0):
            for parameter, value in chosen:
                parameter.data.copy_(value.reshape(parameter.data.shape).to(parameter.dtype))
        for parameter, value in chosen:
            full = value.reshape(_full_shape(parameter)).to(self.ctx.device, torch.float32)
            safe_set_full_fp32_param(parameter, full)

    def _load(self, module: nn.Module, prefix: str, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, value in state.items():
                if prefix + name not in self._by_plain:
                    module.get_buffer(name).copy_(value)
        self._set_parameters({prefix + k: v for k, v in state.items() if prefix + k in self._by_plain})

    def load_model_state(self, state: dict[str, Tensor], what: str) -> None:
        check_state(state, self._reference, what)
        self._load(self.model, "model.", state)

    def load_loss_state(self, state: dict[str, Tensor]) -> None:
        self._load(self.loss, "loss.", state)

    def _materialise_moments(self) -> None:
        """Zero moments for every flat partition, as AdamW's first step would create them, so that saved ones
        can be written into them before any step (DeepSpeed links them to parameters after its first step)."""
        inner = getattr(self.zero, "optimizer", self.zero)
        # The fp32 partitions the inner optimizer steps (ZeRO 3 names them differently from ZeRO 1 and 2).
        flats = getattr(self.zero, "fp32_partitioned_groups_flat", None) or getattr(
            self.zero, "single_partition_of_fp32_groups", None
        )
        if flats is None:
            flats = [flat for group in inner.param_groups for flat in group["params"]]
        for flat in flats:
            if not inner.state.get(flat):
                inner.state[flat] = {
                    "step": torch.tensor(0.0),
                    **{key: torch.zeros_like(flat, memory_format=torch.preserve_format) for key in MOMENTS},
                }
        link = getattr(self.zero, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO 1 and 2
        if link is not None:
            link()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        self._materialise_moments()
        saved = state["state"]
        for index, (_, parameter) in enumerate(self._plain):
            entry = saved.get(index) if index in saved else saved.get(str(index))
            if entry is None:
                continue
            for key in MOMENTS:
                value = entry[key].reshape(_full_shape(parameter)).to(self.ctx.device)
                safe_set_full_optimizer_state(parameter, value, key)
        steps = [entry["step"] for entry in saved.values()]
        inner = getattr(self.zero, "optimizer", self.zero)
        if steps:
            for values in inner.state.values():
                if "step" in values:
                    values["step"] = (
                        steps[0].clone().to(values["step"].device)
                        if torch.is_tensor(values["step"])
                        else int(steps[0])
                    )
        (group,) = self.optimizer.param_groups
        (saved_group,) = state["param_groups"]
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value

"""How training processes share the work: DDP replicas, FSDP2 shards or DeepSpeed ZeRO partitions.

The trainer sees one interface whatever the strategy: `prepare` wraps model and loss (and switches on gradient
checkpointing), `parameters` are what the optimizer updates, `attach` hands the optimizer over, `train_step`
runs forward, backward and the optimizer step. State leaves and enters in the single-process format:
`model_state` / `optimizer_state` gather full state dicts (parameter names as in an unwrapped model; optimizer
state keyed by parameter index, as `torch.optim.AdamW.state_dict()` writes it), so a checkpoint written by a
sharded run loads into a plain run and the other way round, and the kill-safe checkpoint files stay the same.
`evaluating()` lends a module every rank can run on its own users without collectives: ranks evaluate
different numbers of batches, which a sharded model (one all-gather per block and call) cannot do.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from persrec.config import STRATEGIES, Config, ConfigError
from persrec.train.distributed import DistributedContext

FULL_ON_MAIN = "main"  # gather a full state on the main rank only (saving)
FULL_EVERYWHERE = "all"  # every rank gets the full state (evaluation copies)


def resolve_precision(precision: str, device: torch.device, bf16_supported: bool | None = None) -> str:
    """`auto` is bf16 on a CUDA device that supports it and fp32 everywhere else (CPU autocast is slow)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision: expected auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
    return "bf16" if supported else "fp32"


def autocast_for(precision: str, device: torch.device) -> torch.autocast | None:
    """The autocast context of a run's forward passes, or None for plain fp32."""
    if resolve_precision(precision, device) == "fp32":
        return None
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class ModelAndLoss(nn.Module):
    """The model and its loss as one module, so that a sharding wrapper sees the whole step in one `forward`
    (FSDP gathers the root's weights, the item table among them, for that call only)."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> Any:
        queries, targets = self.model(batch)
        return self.loss(
            queries,
            targets,
            self.model.embed_items,
            generator=generator,
            sequence_length=batch["input_ids"].shape[1],
        )


def split_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A `ModelAndLoss` state dict -> (model state, loss state), each keyed as the bare module's."""
    model = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    loss = {k[len("loss.") :]: v for k, v in state.items() if k.startswith("loss.")}
    return model, loss


def joined_state(model: dict[str, Tensor], loss: dict[str, Tensor]) -> dict[str, Tensor]:
    return {**{f"model.{k}": v for k, v in model.items()}, **{f"loss.{k}": v for k, v in loss.items()}}


def check_state(state: dict[str, Tensor], reference: dict[str, Tensor], what: str) -> None:
    """Same keys and shapes as `reference`, or a ConfigError naming the first differences."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    wrong = [
        f"{k} {tuple(v.shape)} (model: {tuple(reference[k].shape)})"
        for k, v in state.items()
        if k in reference and tuple(v.shape) != tuple(reference[k].shape)
    ]
    if wrong:
        raise ConfigError(f"{what} does not match the model: shapes {', '.join(wrong[:3])}")
    if missing or unexpected:
        raise ConfigError(
            f"{what} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Average the gradients of replicated parameters over the ranks (what DDP does for its module's)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= dist.get_world_size()


def indexed_optimizer_state(by_name: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name -> keyed by index in `names` (the single-process format)."""
    index = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def named_optimizer_state(by_index: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `indexed_optimizer_state`."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in by_index["param_groups"]]
    return {"state": {names[int(i)]: s for i, s in by_index["state"].items()}, "param_groups": groups}


class TrainingStrategy:
    """DistributedDataParallel under torchrun (a plain module in a single process): today's behaviour."""

    name = "ddp"

    def __init__(self, config: Config, ctx: DistributedContext) -> None:
        self.config = config
        self.ctx = ctx
        self.autocast = autocast_for(config.precision, ctx.device)

    def prepare(self, model: nn.Module, loss: nn.Module) -> None:
        self.model, self.loss = model, loss
        model.backbone.set_gradient_checkpointing(self.config.gradient_checkpointing)
        self.ddp = (
            DistributedDataParallel(
                model, device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            )
            if self.ctx.enabled
            else None
        )

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters()) + list(self.loss.parameters())

    def attach(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler

    def _forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> Any:
        network = self.ddp or self.model
        queries, targets = network(batch)
        return self.loss(
            queries,
            targets,
            self.model.embed_items,
            generator=generator,
            sequence_length=batch["input_ids"].shape[1],
        )

    def train_step(self, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        """One optimizer step on `batch`; returns the (detached) loss."""
        with self.autocast or contextlib.nullcontext():
            output = self._forward(batch, generator)
        self.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        if self.ddp is not None:  # the loss's parameters (a learned temperature) sit outside the DDP module
            average_gradients(list(self.loss.parameters()))
        max_norm = self.config.optim_args.max_grad_norm
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        return output.loss.detach()

    # ---- state in the single-process format --------------------------------------------------------------
    def model_state(self) -> dict[str, Tensor]:
        """The full model state dict on the main rank (called on every rank: sharded strategies gather)."""
        return self.model.state_dict()

    def loss_state(self) -> dict[str, Tensor]:
        return self.loss.state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_model_state(self, state: dict[str, Tensor], what: str) -> None:
        check_state(state, self.model.state_dict(), what)
        self.model.load_state_dict(state)

    def load_loss_state(self, state: dict[str, Tensor]) -> None:
        self.loss.load_state_dict(state)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        """The model to evaluate with, for the duration of the `with` block."""
        yield self.model


def join_world_of_one(ctx: DistributedContext) -> None:
    """A one-process group, for strategies that need torch.distributed even when not launched by torchrun."""
    if ctx.enabled or dist.is_initialized():
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


class ShardedStrategy(TrainingStrategy):
    """What FSDP and DeepSpeed share: one `ModelAndLoss` module, and evaluation on a full replica."""

    def prepare(self, model: nn.Module, loss: nn.Module) -> None:
        join_world_of_one(self.ctx)
        self.model, self.loss = model, loss
        # A plain copy, filled with the gathered weights for each evaluation; between evaluations it waits in
        # host memory, so a GPU holds only its shards while training.
        self._replica = copy.deepcopy(model).to("cpu")
        self._reference = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
        self._pending_loss_state: dict[str, Tensor] | None = None
        model.backbone.set_gradient_checkpointing(self.config.gradient_checkpointing)
        self.root = ModelAndLoss(model, loss)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.root.parameters())

    def names(self) -> list[str]:
        """Parameter names in optimizer order: entry i of the single-process optimizer state is `names()[i]`."""
        return [name for name, _ in self.root.named_parameters()]

    def full_state(self, where: str) -> dict[str, Tensor]:
        raise NotImplementedError

    def model_state(self) -> dict[str, Tensor]:
        model, self._pending_loss_state = split_state(self.full_state(FULL_ON_MAIN))
        return model

    def loss_state(self) -> dict[str, Tensor]:
        """The loss's share of the state the last `model_state` gathered (one gather per checkpoint)."""
        pending, self._pending_loss_state = self._pending_loss_state, None
        return pending if pending is not None else split_state(self.full_state(FULL_ON_MAIN))[1]

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        model_state, _ = split_state(self.full_state(FULL_EVERYWHERE))
        self._replica.to(self.ctx.device).load_state_dict(model_state)
        del model_state
        try:
            yield self._replica
        finally:
            self._replica.to("cpu")


class FSDPStrategy(ShardedStrategy):
    """FSDP2: `fully_shard` on every block, then on the model and loss as a whole.

    Each rank holds 1/world of every parameter, gradient and optimizer moment; a block's full weights exist only
    while it runs. Gradients are averaged over ranks, as under DDP, so both train the same model.
    """

    name = "fsdp"

    def prepare(self, model: nn.Module, loss: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        super().prepare(model, loss)
        # Ranks initialise with their own seeds: start from rank 0's weights, as DDP does when it wraps a model.
        with torch.no_grad():
            for tensor in [*self.root.parameters(), *self.root.buffers()]:
                dist.broadcast(tensor, src=0)
        # The blocks return their keys/values as views of one projection; nothing edits them in place, which is
        # what FSDP's warning about views is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        world = dist.get_world_size()
        mesh = init_device_mesh(self.ctx.device.type, (world,))
        # FSDP cannot shard a 0-d tensor (the loss's learnable temperature): such parameters stay replicated
        # and their gradients are averaged here, as DDP would.
        self.replicated = [p for p in self.root.parameters() if p.dim() == 0]
        ignored = set(self.replicated)
        for layer in model.backbone.shardable_layers():
            fully_shard(layer, mesh=mesh, ignored_params=ignored)
        fully_shard(self.root, mesh=mesh, ignored_params=ignored)

    def train_step(self, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        with self.autocast or contextlib.nullcontext():
            output = self.root(batch, generator)
        self.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        average_gradients(self.replicated)
        max_norm = self.config.optim_args.max_grad_norm
        if max_norm > 0:  # the model's parameters, as under DDP; the norm is reduced over the shards
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        return output.loss.detach()

    def _options(self, where: str) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if where == FULL_ON_MAIN:
            return StateDictOptions(full_state_dict=True, cpu_offload=True)
        return StateDictOptions(full_state_dict=True)

    def full_state(self, where: str) -> dict[str, Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.root, options=self._options(where))

    def optimizer_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        by_name = get_optimizer_state_dict(self.root, self.optimizer, options=self._options(FULL_ON_MAIN))
        return indexed_optimizer_state(by_name, self.names()) if self.ctx.is_main else {}

    def _load_root(self, state: dict[str, Tensor]) -> None:
        """Load full tensors (the same on every rank) for some of the root's keys; each rank keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.root, state, options=options)

    def load_model_state(self, state: dict[str, Tensor], what: str) -> None:
        check_state(state, self._reference, what)
        self._load_root(joined_state(state, {}))

    def load_loss_state(self, state: dict[str, Tensor]) -> None:
        self._load_root(joined_state({}, state))

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            self.root,
            self.optimizer,
            named_optimizer_state(state, self.names()),
            options=StateDictOptions(full_state_dict=True),
        )


def build_strategy(config: Config, ctx: DistributedContext) -> TrainingStrategy:
    if config.strategy == "ddp":
        return TrainingStrategy(config, ctx)
    if config.strategy == "fsdp":
        return FSDPStrategy(config, ctx)
    if config.strategy == "deepspeed":
        from persrec.train.deepspeed_strategy import DeepSpeedStrategy

        return DeepSpeedStrategy(config, ctx)
    raise ConfigError(f"--strategy: expected one of {', '.join(STRATEGIES)}, got {config.strategy!r}")

"""Learning-rate schedules: linear warmup, then constant or cosine decay to a floor."""

from __future__ import annotations

import math

import torch

from persrec.config import ConfigError, OptimArgs


def lr_multiplier(step: int, total_steps: int, args: OptimArgs) -> float:
    """Factor applied to the base learning rate after `step` optimizer steps."""
    if args.warmup_steps and step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.scheduler == "constant":
        return 1.0
    if args.scheduler == "cosine":
        span = max(1, total_steps - args.warmup_steps)
        progress = min(1.0, (step - args.warmup_steps) / span)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ConfigError(f"optim_args.scheduler={args.scheduler!r}: expected 'constant' or 'cosine'")


def build_optimizer(
    parameters: list[torch.nn.Parameter], args: OptimArgs, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    lr_multiplier(0, total_steps, args)  # validates the scheduler name before training starts
    optimizer = torch.optim.AdamW(
        parameters,
        lr=args.learning_rate,
        betas=(args.beta1, args.beta2),
        eps=args.eps,
        weight_decay=args.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, args)
    )
    return optimizer, scheduler

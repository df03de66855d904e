"""The training loop: epochs of NCE steps, validation, early stopping, checkpoints, exact resume.

Resuming is bit-for-bit: the epoch's batch order is a pure function of (seed, epoch), every RNG the run draws
from is checkpointed, and a resumed run skips the batches its checkpoint already trained.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from persrec.atomic import atomic_write_json
from persrec.config import Config, ConfigError
from persrec.data.sequences import TrainSequences, collate
from persrec.eval.ranking import EvalConfig, format_metrics_table
from persrec.eval.runner import (
    eval_loader,
    evaluate_model,
    evaluate_popularity_baseline,
    training_item_frequencies,
)
from persrec.train import checkpoint as ckpt
from persrec.train.build import build_model, load_dataset, nce_config, window_config
from persrec.train.distributed import DistributedContext
from persrec.train.logging import build_logger
from persrec.train.loss import SampledSoftmaxLoss
from persrec.train.schedule import build_optimizer

LOG_EVERY = 20


@dataclass
class RunResult:
    run_dir: Path
    best_checkpoint: Path
    valid: dict[str, float]
    test: dict[str, float]
    baseline: dict[str, float] | None
    best_epoch: int | None


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _SkippingBatches(torch.utils.data.Sampler):
    """Batches of an epoch in the sampler's order, minus the first `skip` (already trained before a restart)."""

    def __init__(self, sampler: DistributedSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.skip = 0

    def __iter__(self):
        indices = list(self.sampler)
        for start in range(self.skip * self.batch_size, len(indices), self.batch_size):
            yield indices[start : start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size) - self.skip


def default_run_dir(config: Config) -> Path:
    name = config.run_name or f"{config.model}-{Path(config.dataset).name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(config.checkpoint_dir) / name


def resolve_resume(config: Config) -> Path | None:
    """The checkpoint to resume from: `resume` may be true (newest run under checkpoint_dir), a run or a checkpoint."""
    if not config.resume or str(config.resume).lower() in {"false", "0", "no"}:
        return None
    if str(config.resume).lower() in {"true", "1", "yes", "latest"}:
        root = Path(config.checkpoint_dir)
        target = root / config.run_name if config.run_name else None
        if target is None:
            runs = sorted(
                (p for p in root.glob("*") if ckpt.latest_checkpoint(p)), key=lambda p: p.stat().st_mtime
            )
            target = runs[-1] if runs else None
    else:
        target = Path(config.resume)
    found = ckpt.latest_checkpoint(target) if target is not None and target.exists() else None
    if found is None:
        raise ConfigError(f"resume={config.resume!r}: no complete checkpoint found (looked in {target})")
    return found


class Trainer:
    def __init__(self, config: Config, ctx: DistributedContext) -> None:
        self.ctx = ctx
        resume_from = resolve_resume(config)
        self.run_dir = (
            resume_from.parent.parent if resume_from and resume_from.parent.name == "checkpoints" else None
        )
        self.config = config
        seed_everything(config.seed + ctx.rank)
        self.progress = config.show_progress and ctx.is_main
        if ctx.is_main:
            self.store = load_dataset(config, progress=self.progress)
        ctx.barrier()
        if not ctx.is_main:
            self.store = load_dataset(config, progress=False)
        self.window = window_config(config)
        self.model = build_model(config, self.store.num_items, self.store.num_users).to(ctx.device)
        self.loss = SampledSoftmaxLoss(nce_config(config), self.store.num_items).to(ctx.device)
        self.train_set = TrainSequences(self.store, self.window, held_out=2 if config.validation_split else 1)
        if len(self.train_set) == 0:
            raise ConfigError(
                f"dataset {config.dataset!r} has no user with at least 3 interactions to train on"
            )
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed
        )
        self.batches = _SkippingBatches(self.sampler, config.train_batch_size)
        # The loader gets its own generator: drawing its base seed from the global RNG would shift dropout
        # after a mid-epoch resume.
        self.loader = DataLoader(
            self.train_set,
            batch_sampler=self.batches,
            collate_fn=collate,
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed),
        )
        steps_per_epoch = math.ceil(len(self.sampler) / config.train_batch_size)
        total = steps_per_epoch * config.epochs
        if config.max_steps:
            total = min(total, config.max_steps)
        self.total_steps = total
        params = list(self.model.parameters()) + list(self.loss.parameters())
        self.optimizer, self.scheduler = build_optimizer(params, config.optim_args, total)
        self.negatives = torch.Generator(device=ctx.device).manual_seed(config.seed * 1000 + ctx.rank)
        self.state = ckpt.TrainerState()
        self.eval_config = EvalConfig(
            ks=tuple(config.topk), filter_seen=config.filter_seen, ties="pessimistic"
        )
        self.autocast = self._autocast()
        self.ddp = (
            DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
            if ctx.enabled
            else None
        )
        if resume_from is not None:
            self._restore(resume_from)
        if self.run_dir is None:
            self.run_dir = default_run_dir(config)
            if ckpt.latest_checkpoint(self.run_dir) is not None:
                raise ConfigError(
                    f"{self.run_dir} already holds a run; pass --resume true to continue it, "
                    "or choose another --run_name"
                )
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.save_config(config, self.run_dir / "config.yaml")
            if not config.validation_split:
                print(
                    "validation_split=false: the second-to-last items are trained on and epochs are selected "
                    "on the test items, so the test metrics are optimistic",
                    file=sys.stderr,
                )
        self.logger = build_logger(config.logger, self.run_dir, ctx.is_main)

    # ---- setup helpers -------------------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast | None:
        precision = self.config.precision
        if precision == "auto":
            precision = "bf16" if self.ctx.device.type == "cuda" else "fp32"
        if precision == "fp32":
            return None
        if precision == "bf16":
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        raise ConfigError(f"precision={self.config.precision!r}: expected auto, fp32 or bf16")

    def _generators(self) -> dict[str, torch.Generator]:
        return {"negatives": self.negatives}

    def _restore(self, checkpoint: Path) -> None:
        ckpt.load_weights(self.model, checkpoint / "model.safetensors")
        state = torch.load(checkpoint / "optimizer.pt", map_location=self.ctx.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss.load_state_dict(state["loss"])
        self.state = ckpt.load_trainer_state(checkpoint)
        ckpt.restore_rng_state(torch.load(checkpoint / "rng.pt", weights_only=False), self._generators())
        if self.progress:
            print(f"resumed from {checkpoint} (epoch {self.state.epoch}, step {self.state.global_step})")

    def _save(self) -> None:
        if not self.ctx.is_main:
            return
        ckpt.save_checkpoint(
            self.run_dir,
            f"step-{self.state.global_step}",
            model=self.model,
            config=self.config,
            optimizer_state={
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "loss": self.loss.state_dict(),
            },
            trainer_state=self.state,
            generators=self._generators(),
        )

    # ---- training ------------------------------------------------------------------------------------------
    def _step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        network = self.ddp or self.model
        with self.autocast or contextlib.nullcontext():
            queries, targets = network(batch)
            output = self.loss(
                queries,
                targets,
                self.model.embed_items,
                generator=self.negatives,
                sequence_length=batch["input_ids"].shape[1],
            )
        self.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        if self.config.optim_args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim_args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return output.loss.detach()

    def _done(self) -> bool:
        return bool(self.config.max_steps) and self.state.global_step >= self.config.max_steps

    def train_epoch(self) -> float:
        self.model.train()
        self.sampler.set_epoch(self.state.epoch)
        self.batches.skip = self.state.batch_in_epoch
        bar = tqdm(
            total=len(self.batches) + self.batches.skip,
            initial=self.batches.skip,
            desc=f"epoch {self.state.epoch}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        loss_sum = torch.zeros((), device=self.ctx.device)
        steps = 0
        started = time.perf_counter()
        for batch in self.loader:
            batch = {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}
            loss_sum += self._step(batch)
            steps += 1
            self.state.global_step += 1
            self.state.batch_in_epoch += 1
            bar.update(1)
            if steps % LOG_EVERY == 0:  # reading the loss syncs with the device: only now and then
                rate = (
                    steps
                    * self.config.train_batch_size
                    * self.ctx.world_size
                    / (time.perf_counter() - started)
                )
                bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}", seq_per_s=f"{rate:.0f}")
            if self.config.save_every_steps and self.state.global_step % self.config.save_every_steps == 0:
                self._save()
            if self._done():
                break
        bar.close()
        return loss_sum.item() / max(steps, 1)

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of `split`; without a validation split, "valid" (epoch selection) is the test item."""
        if split == "valid" and not self.config.validation_split:
            split = "test"
        loader = eval_loader(
            self.store, split, self.window, self.config.eval_batch_size, self.ctx, self.config.filter_seen
        )
        return evaluate_model(self.model, loader, self.eval_config, self.ctx.device, self.autocast)

    def _improved(self, metrics: dict[str, float]) -> bool:
        key = self.config.valid_metric
        if key not in metrics:
            raise ConfigError(
                f"valid_metric={key!r} is not measured; choose one of {', '.join(sorted(metrics))}"
            )
        best = self.state.best_metric
        return best is None or metrics[key] > best

    def fit(self) -> RunResult:
        best_path = self.run_dir / "best" / "model.safetensors"
        while self.state.epoch < self.config.epochs and not self._done():
            started = time.perf_counter()
            loss = self.train_epoch()
            epoch = self.state.epoch
            record: dict[str, Any] = {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - started}
            if self.state.batch_in_epoch >= len(self.batches) + self.batches.skip:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
            evaluate_now = (
                epoch + 1
            ) % self.config.eval_interval == 0 or self.state.epoch >= self.config.epochs
            if evaluate_now or self._done():
                valid = self.evaluate("valid")
                record.update({f"valid/{k}": v for k, v in valid.items() if k != "count"})
                if self._improved(valid):
                    self.state.best_metric = valid[self.config.valid_metric]
                    self.state.best_epoch = epoch
                    self.state.evaluations_without_improvement = 0
                    if self.ctx.is_main:
                        best_path.parent.mkdir(parents=True, exist_ok=True)
                        ckpt.save_weights(self.model, best_path)
                else:
                    self.state.evaluations_without_improvement += 1
                if self.progress:
                    metric = self.config.valid_metric
                    print(
                        f"epoch {epoch}: loss {loss:.4f}, valid {metric} {valid[metric]:.4f} "
                        f"(best {self.state.best_metric:.4f} at epoch {self.state.best_epoch}), "
                        f"{record['seconds']:.1f}s"
                    )
            self.state.history.append(record)
            self.logger.log(self.state.global_step, record)
            self._save()
            if self.state.evaluations_without_improvement >= self.config.stopping_step:
                if self.progress:
                    print(
                        f"early stopping: no improvement of {self.config.valid_metric} in {self.config.stopping_step} evaluations"
                    )
                break
        self.ctx.barrier()
        if best_path.is_file():
            ckpt.load_weights(self.model, best_path)
        else:  # never evaluated (e.g. max_steps hit before an evaluation): the final weights are the result
            if self.ctx.is_main:
                best_path.parent.mkdir(parents=True, exist_ok=True)
                ckpt.save_weights(self.model, best_path)
        return self.final_report(best_path)

    def final_report(self, best_path: Path) -> RunResult:
        valid, test = self.evaluate("valid"), self.evaluate("test")
        baseline = None
        if self.config.popularity_baseline:
            loader = eval_loader(
                self.store,
                "test",
                self.window,
                self.config.eval_batch_size,
                self.ctx,
                self.config.filter_seen,
            )
            baseline = evaluate_popularity_baseline(
                self.store, loader, self.eval_config, training_item_frequencies(self.store)
            )
        results = {"valid": valid, "test": test}
        if baseline is not None:
            results["test (popularity baseline)"] = baseline
        if self.ctx.is_main:
            ckpt.save_config(self.config, best_path.parent / "config.yaml")
            summary = {"best_epoch": self.state.best_epoch, "filter_seen": self.config.filter_seen, **results}
            atomic_write_json(self.run_dir / "results.json", summary)
            self.logger.log(self.state.global_step, {f"test/{k}": v for k, v in test.items() if k != "count"})
            self.logger.close()
        return RunResult(self.run_dir, best_path.parent, valid, test, baseline, self.state.best_epoch)

    def print_validation(self) -> None:
        valid = self.evaluate("valid")
        if self.ctx.is_main:
            print(
                format_metrics_table(
                    {"valid": valid}, filter_seen=self.config.filter_seen, ties=self.eval_config.ties
                )
            )

    def print_report(self, result: RunResult) -> None:
        if not self.ctx.is_main:
            return
        selection = "valid" if self.config.validation_split else "valid (= test: no validation split)"
        results = {selection: result.valid, "test": result.test}
        if result.baseline is not None:
            results["test (popularity baseline)"] = result.baseline
        print(format_metrics_table(results, filter_seen=self.config.filter_seen, ties=self.eval_config.ties))
        print(f"best epoch: {result.best_epoch}; best weights + config: {result.best_checkpoint}")
        print(f"checkpoints: {result.run_dir / 'checkpoints'}; logs: {result.run_dir}")

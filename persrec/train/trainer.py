"""The training loop: epochs of NCE steps, validation, early stopping, checkpoints, exact resume.

Resuming is bit-for-bit: the epoch's batch order is a pure function of (seed, epoch), every RNG stream of every
rank is checkpointed, a resumed run skips the batches its checkpoint already trained, and its metric log is
rebuilt from the checkpoint's records, so it reads as if the run had never stopped.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

import persrec
from persrec.atomic import atomic_write_json
from persrec.config import Config, ConfigError
from persrec.data.fingerprint import dataset_fingerprint, require_same_dataset
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
from persrec.train.interrupt import StopRequests, TrainingInterrupted
from persrec.train.logging import build_logger
from persrec.train.loss import SampledSoftmaxLoss
from persrec.train.resume import PATH_KEYS, run_dir_of, training_finished
from persrec.train.schedule import build_optimizer
from persrec.train.strategy import build_strategy

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


class Trainer:
    def __init__(self, config: Config, ctx: DistributedContext, resume_from: Path | None = None) -> None:
        """`resume_from`: a checkpoint to continue (its config is `config`: see `persrec.train.resume`)."""
        config.validate()  # library callers get the command line's checks before anything is built
        self.ctx = ctx
        self.run_dir = run_dir_of(resume_from) if resume_from is not None else None
        self._process_started = time.perf_counter()
        seed_everything(config.seed + ctx.rank)
        self.progress = config.show_progress and ctx.is_main
        if ctx.is_main:
            self.store = load_dataset(config, progress=self.progress)
        ctx.barrier()
        if not ctx.is_main:
            self.store = load_dataset(config, progress=False)
        # Paths are stored resolved: the run must not depend on its working directory.
        for key in PATH_KEYS:
            value = getattr(config, key)
            if value and Path(value).expanduser().exists():
                config = config.replace(**{key: str(Path(value).expanduser().resolve())})
        self.config = config
        self.fingerprint = dataset_fingerprint(self.store)
        self.window = window_config(config)
        self.model = build_model(
            config, self.store.num_items, self.store.num_users, dataset_dir=self.store.path
        ).to(ctx.device)
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
        # The strategy wraps (FSDP: shards) model and loss before the optimizer sees their parameters.
        self.strategy = build_strategy(config, ctx)
        self.strategy.prepare(self.model, self.loss)
        self.optimizer, self.scheduler = build_optimizer(self.strategy.parameters(), config.optim_args, total)
        self.strategy.attach(self.optimizer, self.scheduler)
        self.negatives = torch.Generator(device=ctx.device).manual_seed(config.seed * 1000 + ctx.rank)
        self.state = ckpt.TrainerState()
        self.eval_config = EvalConfig(
            ks=tuple(config.topk), filter_seen=config.filter_seen, ties="pessimistic"
        )
        self.autocast = self.strategy.autocast
        self.stop = StopRequests()
        self._loss_sum: torch.Tensor | None = None
        self._epoch_started = time.perf_counter()
        self._last_saved: tuple[int, int, int, int] | None = None
        if resume_from is not None:
            self._restore(resume_from)
        if self.run_dir is None:
            self.run_dir = default_run_dir(config)
            if ckpt.latest_checkpoint(self.run_dir) is not None:
                raise ConfigError(
                    f"{self.run_dir} already holds a run; pass --resume true to continue it, "
                    "or choose another --run_name"
                )
        self._elapsed_before = self.state.elapsed_seconds
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.save_config(config, self.run_dir / "config.yaml")
            if not config.validation_split:
                print(
                    "validation_split=false: the second-to-last items are trained on and epochs are selected "
                    "on the test items, so the test metrics are optimistic",
                    file=sys.stderr,
                )
        self.logger = build_logger(config.logger, self.run_dir, ctx.is_main, self.state.history)

    # ---- setup helpers -------------------------------------------------------------------------------------
    def _generators(self) -> dict[str, torch.Generator]:
        return {"negatives": self.negatives}

    def _restore(self, checkpoint: Path) -> None:
        require_same_dataset(
            ckpt.load_dataset_fingerprint(checkpoint), self.fingerprint, f"the run resumed from {checkpoint}"
        )
        weights = checkpoint / "model.safetensors"
        self.strategy.load_model_state(ckpt.read_weights(weights), str(weights))
        state = ckpt.load_optimizer_state(checkpoint, self.ctx.device)
        self.strategy.load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.load_loss_state(state["loss"])
        self.state = ckpt.load_trainer_state(checkpoint)
        rng = ckpt.load_rng_state(checkpoint, self.ctx.rank, self.ctx.world_size)
        ckpt.restore_rng_state(rng, self._generators())
        if self.progress:
            print(f"resumed from {checkpoint} (epoch {self.state.epoch}, step {self.state.global_step})")

    def _save(self) -> None:
        """Every rank contributes its RNG streams; rank 0 writes the checkpoint."""
        if self._last_saved == self._progress():
            return  # e.g. a stop request right after a periodic save: that checkpoint is this one
        if self._loss_sum is not None:  # mid-epoch: remember the running loss and time of the epoch
            self.state.epoch_loss_sum = self._loss_sum.item()
            self.state.epoch_seconds = self._epoch_seconds()
        self.state.elapsed_seconds = self._elapsed_before + time.perf_counter() - self._process_started
        states = [ckpt.rng_state(self._generators())]
        if self.ctx.enabled:
            gathered: list[dict[str, Any] | None] = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered  # type: ignore[assignment]
        # Gathering a sharded state is a collective: every rank takes part, the main rank writes.
        model_state = self.strategy.model_state()
        optimizer_state = {
            "optimizer": self.strategy.optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "loss": self.strategy.loss_state(),
        }
        if self.ctx.is_main:
            ckpt.save_checkpoint(
                self.run_dir,
                f"step-{self.state.global_step}",
                model=model_state,
                config=self.config,
                optimizer_state=optimizer_state,
                trainer_state=self.state,
                rng_states=states,
                dataset_fingerprint=self.fingerprint,
            )
        self._last_saved = self._progress()

    def _progress(self) -> tuple[int, int, int, int]:
        """Where training stands; two saves at the same point would write the same checkpoint."""
        state = self.state
        return state.global_step, state.epoch, state.batch_in_epoch, len(state.history)

    def resume_command(self) -> str:
        launcher = (
            f"torchrun --nproc_per_node {self.ctx.world_size} -m persrec.cli"
            if self.ctx.enabled
            else "persrec"
        )
        return f"{launcher} train --resume {self.run_dir}"

    def _check_stop(self) -> None:
        """After a step: on SIGINT/SIGTERM (on any rank) save a checkpoint and stop."""
        signum = self.stop.agreed(self.ctx.enabled, self.ctx.device)
        if signum is None:
            return
        self._save()
        latest = ckpt.latest_checkpoint(self.run_dir) if self.ctx.is_main else None
        raise TrainingInterrupted(signum, str(latest), self.resume_command())

    # ---- training ------------------------------------------------------------------------------------------
    def _step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.strategy.train_step(batch, self.negatives)

    def _done(self) -> bool:
        return bool(self.config.max_steps) and self.state.global_step >= self.config.max_steps

    def _epoch_seconds(self) -> float:
        return self.state.epoch_seconds + time.perf_counter() - self._epoch_started

    def train_epoch(self) -> tuple[float, float]:
        """Train the rest of the current epoch: (mean loss over all its batches, its seconds)."""
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
        # A float32 running sum, continued from a mid-epoch checkpoint exactly as if never interrupted.
        self._loss_sum = torch.tensor(self.state.epoch_loss_sum, dtype=torch.float32, device=self.ctx.device)
        self._epoch_started = time.perf_counter()
        for steps, batch in enumerate(self.loader, start=1):
            batch = {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}
            self._loss_sum += self._step(batch)
            self.state.global_step += 1
            self.state.batch_in_epoch += 1
            bar.update(1)
            if steps % LOG_EVERY == 0:  # reading the loss syncs with the device: only now and then
                rate = (
                    steps
                    * self.config.train_batch_size
                    * self.ctx.world_size
                    / (time.perf_counter() - self._epoch_started)
                )
                bar.set_postfix(
                    loss=f"{self._loss_sum.item() / self.state.batch_in_epoch:.4f}", seq_per_s=f"{rate:.0f}"
                )
            if self.config.save_every_steps and self.state.global_step % self.config.save_every_steps == 0:
                self._save()
            if self._done():
                break
            self._check_stop()
        bar.close()
        loss = self._loss_sum.item() / max(self.state.batch_in_epoch, 1)
        seconds = self._epoch_seconds()
        self._loss_sum = None
        return loss, seconds

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of `split`; without a validation split, "valid" (epoch selection) is the test item."""
        if split == "valid" and not self.config.validation_split:
            split = "test"
        loader = eval_loader(
            self.store, split, self.window, self.config.eval_batch_size, self.ctx, self.config.filter_seen
        )
        with self.strategy.evaluating() as model:
            return evaluate_model(model, loader, self.eval_config, self.ctx.device, self.autocast)

    def _improved(self, metrics: dict[str, float]) -> bool:
        key = self.config.valid_metric
        if key not in metrics:
            raise ConfigError(
                f"valid_metric={key!r} is not measured; choose one of {', '.join(sorted(metrics))}"
            )
        best = self.state.best_metric
        return best is None or metrics[key] > best

    def finished(self) -> bool:
        """The training loop has nothing left to do (epochs done, max_steps reached or stopped early)."""
        return training_finished(self.state, self.config)

    def _save_best(self, best_dir: Path) -> None:
        model_state = self.strategy.model_state()
        if self.ctx.is_main:
            ckpt.save_model_files(best_dir, self.config, self.fingerprint, self.store.path, self.model)
            ckpt.save_weights(model_state, best_dir / "model.safetensors")

    def fit(self) -> RunResult:
        """Train until done, then report; SIGINT/SIGTERM end it with a checkpoint (`TrainingInterrupted`)."""
        self.stop.install()
        try:
            self._train_loop()
        finally:
            self.stop.uninstall()
        best_path = self.run_dir / "best" / "model.safetensors"
        self.ctx.barrier()
        if best_path.is_file():
            self.strategy.load_model_state(ckpt.read_weights(best_path), str(best_path))
        else:  # never evaluated (e.g. max_steps hit before an evaluation): the final weights are the result
            self._save_best(best_path.parent)
        return self.final_report(best_path)

    def _train_loop(self) -> None:
        while not self.finished():
            epoch = self.state.epoch
            loss, seconds = self.train_epoch()
            record: dict[str, Any] = {"epoch": epoch, "loss": loss, "seconds": seconds}
            if self.state.batch_in_epoch >= len(self.batches) + self.batches.skip:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
            self.state.epoch_loss_sum = 0.0
            self.state.epoch_seconds = 0.0
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
                    self._save_best(self.run_dir / "best")
                else:
                    self.state.evaluations_without_improvement += 1
                if self.progress:
                    metric = self.config.valid_metric
                    print(
                        f"epoch {epoch}: loss {loss:.4f}, valid {metric} {valid[metric]:.4f} "
                        f"(best {self.state.best_metric:.4f} at epoch {self.state.best_epoch}), "
                        f"{seconds:.1f}s"
                    )
            self.state.stopped_early = self.state.evaluations_without_improvement >= self.config.stopping_step
            record["step"] = self.state.global_step
            self.state.history.append(record)
            self.logger.log(self.state.global_step, record)
            self._save()
            if self.state.stopped_early and self.progress:
                print(
                    f"early stopping: no improvement of {self.config.valid_metric} in "
                    f"{self.config.stopping_step} evaluations"
                )
            self._check_stop()

    def _serving_item_table(self) -> torch.Tensor | None:
        """A trainable item LLM's vectors under the loaded (best) weights, which serving ranks with instead of
        running the item LLM; None for every other model. Every rank takes part (a sharded model is gathered)."""
        backbone = getattr(self.model, "module", self.model).backbone
        if getattr(backbone, "frozen_items", True):
            return None
        with self.strategy.evaluating() as model:
            return getattr(model, "module", model).backbone.serving_item_table()

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
        serving_table = self._serving_item_table()
        if self.ctx.is_main:
            ckpt.save_model_files(
                best_path.parent, self.config, self.fingerprint, self.store.path, self.model
            )
            if serving_table is not None:
                ckpt.save_item_table(best_path.parent, serving_table)
            atomic_write_json(self.run_dir / "results.json", self._summary(results))
            self.logger.log(self.state.global_step, {f"test/{k}": v for k, v in test.items() if k != "count"})
            self.logger.close()
        return RunResult(self.run_dir, best_path.parent, valid, test, baseline, self.state.best_epoch)

    def _summary(self, results: dict[str, dict[str, float]]) -> dict[str, Any]:
        """results.json: the metrics and everything needed to know what produced them."""
        elapsed = self._elapsed_before + time.perf_counter() - self._process_started
        parameters = sum(p.numel() for p in self.model.parameters())
        return {
            "best_epoch": self.state.best_epoch,
            "filter_seen": self.config.filter_seen,
            **{
                split: {k: int(v) if k == "count" else v for k, v in metrics.items()}
                for split, metrics in results.items()
            },
            "epochs_trained": self.state.epoch,
            "global_step": self.state.global_step,
            "stopped_early": self.state.stopped_early,
            "wall_seconds": round(elapsed, 3),
            "parameters": parameters,
            "loss_parameters": sum(p.numel() for p in self.loss.parameters()),
            "world_size": self.ctx.world_size,
            "versions": {
                "persrec": persrec.__version__,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
            },
            "dataset": self.fingerprint,
            "config": self.config.to_dict(),
        }

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

"""Training-step throughput: sequences/s, peak memory and achieved GFLOP/s of SASRec and HSTU.

A step is what `persrec.train.trainer.Trainer` does per batch: `model.training_outputs` -> `SampledSoftmaxLoss`
-> backward -> gradient clipping -> AdamW step. Rows:

- the authors' PerSRec configuration: HSTU, 16 layers, d=64, 8 heads, a window of 500 items (400 history +
  100 recent) with 4 expert tokens after the history, batch 8, 512 sampled negatives per sequence (the
  trainer's default; the authors' scripts split one large negative count across the batch), 3,706 items;
- both backbones at window lengths 200, 512, 1024 and 2048 (plain causal models, same width and depth), with
  the batch chosen to keep B·L near 4096 tokens so that every row fits in memory.

HSTU rows are timed with each attention path of `persrec.models.hstu_attention` in the same run: `auto` (what
training uses: the fused C kernel where it can be built, else the tiled path), `tiled` (PyTorch ops only) and
`reference` (the plain [B, H, L, S] definition; skipped where its saved scores would need more than
--reference-gb). Ratios are against `reference`; the authors' row also shows the ratio to 1.6 sequences/s, the
throughput of the authors' released HSTU code on this CPU (quoted, not measured here). Paths are timed
interleaved, median of the runs, so that load from other processes hits all of them alike; next to the wall
time each row reports the process CPU time per step (all threads), the load average and the share of the
asked-for CPU the process got, which tell how much of a slow row is other people's work.

FLOPs are counted analytically from matrix products only (2·m·n·k; forward + backward = 3 x forward): linear
layers, attention over the (query, key) pairs the mask allows (L(L+1)/2 per causal sequence, the block-sparse
expert pattern for the authors' row: products over hidden pairs are not counted even where a kernel computes
them) and the loss logits (N positions x (1 + negatives) x D). Norms, embeddings, pointwise functions and the
optimizer are not counted. The matmul peak is a 2048 x 2048 fp32 torch.mm at the same thread count, re-measured
before every row (the attainable rate drifts with load). Peak memory is the process's resident-set high-water
mark during one extra, untimed step (reset before it through /proc/self/clear_refs where the kernel allows it).

On a shared machine, OpenMP's default spin-waiting makes multi-threaded PyTorch collapse when other processes
compete for the cores; `OMP_WAIT_POLICY=PASSIVE` avoids that (the policy in use is part of every row).

    python benchmarks/train_throughput.py --quick
    python benchmarks/train_throughput.py --json throughput.json
    python benchmarks/train_throughput.py --models HSTU --lengths 512 2048 --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from persrec.atomic import atomic_write_json
from persrec.config import Config
from persrec.flops import layer_flops
from persrec.models.experts import ExpertLayout
from persrec.timing import format_figure, matmul_rate, timed_call
from persrec.train.build import build_model, nce_config
from persrec.train.loss import SampledSoftmaxLoss
from persrec.train.schedule import build_optimizer

MODELS = ("SASRec", "HSTU")
LENGTHS = (200, 512, 1024, 2048)
TOKENS_PER_BATCH = 4096
# Sequences/s of the authors' released HSTU (PerSRec configuration) on the 2-core EPYC this was developed on.
AUTHORS_RELEASE_SEQ_PER_S = 1.6
# Side of the square fp32 matmul whose rate is the peak.
PEAK_SIZE = 2048
# A timed step longer than this is worth keeping from the warm-up run (first-call costs are noise against it).
LONG_STEP_S = 5.0


@dataclass(frozen=True)
class RowSpec:
    """One configuration: backbone, window, batch and (for the authors' row) the expert layout."""

    model: str
    seq_len: int  # items in the window
    batch: int
    experts: int = 0  # expert tokens k (0 = plain backbone)
    history: int = 0  # P: items before the experts
    layers: int = 16
    dim: int = 64
    heads: int = 8
    items: int = 3706  # MovieLens-1M's catalogue
    negatives: int = 512
    seed: int = 0
    label: str = ""

    def config(self, attention: str = "auto") -> Config:
        extra: dict[str, object] = {"attention_implementation": attention}
        if self.experts:
            extra.update(
                number_of_user_tokens=self.experts,
                pretrain_item_num=self.history,
                recent_item_num=self.seq_len - self.history,
            )
        return Config(
            model=self.model,
            MAX_ITEM_LIST_LENGTH=self.seq_len,
            n_layers=self.layers,
            n_heads=self.heads,
            item_embedding_size=self.dim,
            num_negatives=self.negatives,
            train_batch_size=self.batch,
            seed=self.seed,
            **extra,
        )


AUTHORS = RowSpec("HSTU", 500, 8, experts=4, history=400, label="authors")


def plain_row(model: str, seq_len: int, **overrides: object) -> RowSpec:
    batch = max(1, TOKENS_PER_BATCH // seq_len)
    return replace(RowSpec(model, seq_len, batch), **overrides)


# ---- measurement helpers ----------------------------------------------------------------------------------
def matmul_peak(device: torch.device, runs: int = 5) -> float:
    """fp32 FLOP/s of a large square torch.mm (median of `runs`, wall clock)."""
    return matmul_rate(device, PEAK_SIZE, runs)[0]


def _libc() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL("libc.so.6")
        library.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return library


_LIBC = _libc()


class PeakMemory:
    """Resident-set high-water mark of this process (CPU) or the allocator's peak (CUDA), in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if _LIBC is not None:
            _LIBC.malloc_trim(0)  # hand freed heap pages back, so the mark starts from live memory
        try:  # "5" resets the VmHWM counter (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass  # the counter then covers the whole process lifetime

    def read_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_flops(model: nn.Module, spec: RowSpec, mask_pairs: int) -> dict[str, float]:
    """Analytic matmul FLOPs of one training step (forward + backward = 3 x forward), by part.

    mask_pairs: allowed (query, key) pairs of one sequence. Linear layers: 2·in·out per token and layer;
    attention: 2·(H·dk + H·dv) per allowed pair and layer; loss: 2·D per (position, candidate) with
    1 + negatives candidates per position.
    """
    backbone = model.backbone
    block = layer_flops(backbone)
    slots = spec.seq_len + spec.experts
    forward = {
        "linear": spec.batch * block.depth * slots * block.linear,
        "attention": spec.batch * block.depth * mask_pairs * block.per_pair,
        "loss": spec.batch * spec.seq_len * (1 + spec.negatives) * 2 * backbone.dim,
    }
    return {name: 3.0 * value for name, value in forward.items()}


def allowed_pairs(spec: RowSpec) -> int:
    """(query, key) pairs one full-length sequence's mask allows."""
    if not spec.experts:
        return spec.seq_len * (spec.seq_len + 1) // 2
    layout = ExpertLayout(spec.seq_len, ((spec.history, spec.experts),))
    return int(layout.slot_tables["mask"].sum())


def reference_bytes(spec: RowSpec) -> float:
    """Rough memory the reference HSTU attention keeps for backward: scores, weights and the float mask."""
    slots = spec.seq_len + spec.experts
    return 3.0 * spec.layers * spec.batch * spec.heads * slots * slots * 4


@dataclass
class Trainee:
    """A model, its loss, optimizer and one fixed batch: everything a step needs."""

    step: Callable[[], torch.Tensor]
    model: nn.Module


def build_trainee(
    spec: RowSpec, device: torch.device, attention: str = "auto", config: Config | None = None
) -> Trainee:
    """The trainer's step (`Trainer._step`) on a random full-length batch; `attention` picks the HSTU path.

    `config`: used instead of `spec.config(attention)` (options a RowSpec does not carry, e.g. a user model
    directory); `spec` still gives the batch shape."""
    config = config or spec.config(attention)
    torch.manual_seed(spec.seed)
    model = build_model(config, spec.items).to(device).train()
    loss = SampledSoftmaxLoss(nce_config(config), spec.items).to(device)
    params = list(model.parameters()) + list(loss.parameters())
    optimizer, scheduler = build_optimizer(params, config.optim_args, total_steps=1_000_000)
    generator = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(1, spec.items + 1, (spec.batch, spec.seq_len + 1), generator=generator).to(device)
    batch = {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:]}
    negatives = torch.Generator(device=device).manual_seed(spec.seed + 2)
    max_norm = config.optim_args.max_grad_norm
    length = batch["input_ids"].shape[1]

    def step() -> torch.Tensor:
        queries, targets = model.training_outputs(batch)
        output = loss(queries, targets, model.embed_items, generator=negatives, sequence_length=length)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        return output.loss.detach()

    return Trainee(step, model)


def time_paths(
    paths: dict[str, Trainee], device: torch.device, repeats: int, budget_s: float
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float], float]:
    """(wall, process CPU) seconds per step of every path, each path's peak memory, and the share of the
    asked-for CPU the process got. One warm-up step per path (kernel builds, allocator growth), then up to
    `repeats` runs within `budget_s` per path, interleaved round-robin so that load bursts hit every path
    alike. CPU seconds (all threads together) tell what a step costs when other processes take turns on the
    cores: on an idle machine the wall time approaches CPU time / threads."""
    memory = PeakMemory(device)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    peaks: dict[str, float] = {name: 0.0 for name in paths}
    wanted: dict[str, int] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    for name, trainee in paths.items():
        first = _timed(trainee, device)
        if first[0] > LONG_STEP_S:
            samples[name].append(first)
        wanted[name] = max(2, min(repeats, int(budget_s / max(first[0], 1e-9)))) - len(samples[name])
    rounds = max(wanted.values())
    for index in range(rounds):
        for name, trainee in paths.items():
            if (index + 1) * wanted[name] // rounds > index * wanted[name] // rounds:
                samples[name].append(_timed(trainee, device))
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    share = (time.process_time() - cpu) / (time.perf_counter() - wall) / threads
    # Memory in one more, untimed step per path: resetting the mark hands freed pages back to the system, and
    # the timed steps should not pay for faulting them in again.
    for name, trainee in paths.items():
        memory.reset()
        trainee.step()
        peaks[name] = memory.read_mb()
    return samples, peaks, share


def _timed(trainee: Trainee, device: torch.device) -> tuple[float, float]:
    """Wall and process CPU seconds of one training step."""
    wall, cpu = timed_call(trainee.step, device)
    return wall, wall if cpu is None else cpu


def run_row(
    spec: RowSpec, device: torch.device, repeats: int, budget_s: float, reference_gb: float
) -> list[dict[str, object]]:
    """Time one configuration under each applicable path; one result record per path."""
    load_start = os.getloadavg()[0]
    peak = matmul_peak(device)
    names = ["auto"]
    if spec.model == "HSTU":
        names.append("tiled")
        if reference_bytes(spec) <= reference_gb * 2**30:
            names.append("reference")
    paths = {name: build_trainee(spec, device, name) for name in names}
    samples, peaks, share = time_paths(paths, device, repeats, budget_s)
    load_end = os.getloadavg()[0]
    model = paths["auto"].model
    flops = step_flops(model, spec, allowed_pairs(spec))
    total = sum(flops.values())
    step_s = {name: statistics.median(wall for wall, _ in values) for name, values in samples.items()}
    cpu_s = {name: statistics.median(cpu for _, cpu in values) for name, values in samples.items()}
    rows = []
    for name in names:
        seconds = step_s[name]
        row: dict[str, object] = {
            "model": spec.model,
            "label": spec.label or "plain",
            "seq_len": spec.seq_len,
            "slots": spec.seq_len + spec.experts,
            "experts": spec.experts,
            "batch": spec.batch,
            "layers": spec.layers,
            "dim": spec.dim,
            "heads": spec.heads,
            "items": spec.items,
            "negatives": spec.negatives,
            "attention": name if spec.model == "HSTU" else "sdpa",
            "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else 0,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "step_ms": seconds * 1e3,
            "seq_per_s": spec.batch / seconds,
            "cpu_ms": cpu_s[name] * 1e3,
            "seq_per_cpu_s": spec.batch / cpu_s[name],
            "peak_mem_mb": peaks[name],
            "gflop": total / 1e9,
            "gflop_by_part": {part: value / 1e9 for part, value in flops.items()},
            "gflop_per_s": total / seconds / 1e9,
            "peak_gflop_per_s": peak / 1e9,
            "pct_of_peak": 100 * total / seconds / peak,
            "runs": len(samples[name]),
            "step_ms_all": [wall * 1e3 for wall, _ in samples[name]],
            "cpu_share": share,
            "load_1m_start": load_start,
            "load_1m_end": load_end,
        }
        if "reference" in step_s:
            row["speedup_vs_reference"] = step_s["reference"] / seconds
        if spec.label == "authors":
            row["vs_authors_release"] = row["seq_per_s"] / AUTHORS_RELEASE_SEQ_PER_S
        rows.append(row)
    return rows


# ---- reporting --------------------------------------------------------------------------------------------
def markdown(rows: list[dict[str, object]]) -> str:
    columns = [
        ("model", lambda r: r["model"] + (" + experts (authors' config)" if r["label"] == "authors" else "")),
        ("L (+k)", lambda r: f"{r['seq_len']}" + (f" (+{r['experts']})" if r["experts"] else "")),
        ("batch", lambda r: r["batch"]),
        ("attention", lambda r: r["attention"]),
        ("seq/s", lambda r: format_figure(r["seq_per_s"])),
        ("step ms", lambda r: format_figure(r["step_ms"])),
        ("CPU ms/step", lambda r: format_figure(r["cpu_ms"])),
        ("peak mem MB", lambda r: f"{r['peak_mem_mb']:,.0f}"),
        ("GFLOP/step", lambda r: format_figure(r["gflop"])),
        ("GFLOP/s", lambda r: format_figure(r["gflop_per_s"])),
        ("matmul peak", lambda r: format_figure(r["peak_gflop_per_s"])),
        ("% of peak", lambda r: f"{r['pct_of_peak']:.1f}"),
        (
            "vs reference",
            lambda r: f"{r['speedup_vs_reference']:.1f}x" if "speedup_vs_reference" in r else "-",
        ),
        ("vs 1.6 seq/s", lambda r: f"{r['vs_authors_release']:.1f}x" if "vs_authors_release" in r else "-"),
        ("cpu share", lambda r: f"{r['cpu_share']:.2f}"),
        ("load 1m", lambda r: f"{r['load_1m_start']:.1f}-{r['load_1m_end']:.1f}"),
    ]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(get(row)) for _, get in columns) + " |" for row in rows]
    return "\n".join(lines)


def row_specs(args: argparse.Namespace) -> list[RowSpec]:
    common = {"layers": args.layers, "dim": args.dim, "heads": args.heads, "negatives": args.negatives}
    specs = [replace(AUTHORS, **common)] if args.authors else []
    for model in args.models:
        for length in args.lengths:
            overrides = dict(common)
            if args.batch:
                overrides["batch"] = args.batch
            specs.append(plain_row(model, length, **overrides))
    return specs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, choices=MODELS, help="backbones of the length rows")
    p.add_argument("--lengths", nargs="+", type=int, default=None, help=f"window lengths (default {LENGTHS})")
    p.add_argument(
        "--batch", type=int, default=0, help=f"batch of the length rows (0 = {TOKENS_PER_BATCH} // L)"
    )
    p.add_argument(
        "--no-authors", dest="authors", action="store_false", help="skip the authors' configuration"
    )
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--negatives", type=int, default=512, help="sampled negatives shared by the batch")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=None, help="most timed steps per path and row (default 7)")
    p.add_argument("--budget-s", type=float, default=None, help="timing budget per path and row (default 30)")
    p.add_argument(
        "--reference-gb", type=float, default=4.0, help="skip the reference path above this memory"
    )
    p.add_argument(
        "--quick", action="store_true", help="the authors' row and L=200 for both backbones, 3 steps"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the rows as a JSON list of objects")
    args = p.parse_args(argv)
    quick = {"models": list(MODELS), "lengths": [200], "repeats": 3, "budget_s": 8.0}
    full = {"models": list(MODELS), "lengths": list(LENGTHS), "repeats": 7, "budget_s": 30.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch sees no CUDA device")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    print(
        f"device {device} ({threads} threads, OMP_WAIT_POLICY {policy}), torch {torch.__version__}",
        file=sys.stderr,
    )
    rows: list[dict[str, object]] = []
    for spec in row_specs(args):
        records = run_row(spec, device, args.repeats, args.budget_s, args.reference_gb)
        rows += records
        summary = ", ".join(
            f"{r['attention']} {r['seq_per_s']:.2f} seq/s ({r['step_ms']:.0f} ms)" for r in records
        )
        print(
            f"{spec.model} L={spec.seq_len} k={spec.experts} batch={spec.batch}: {summary}; peak "
            f"{records[0]['peak_gflop_per_s']:.0f} GFLOP/s, cpu share {records[0]['cpu_share']:.2f}, "
            f"load {records[0]['load_1m_end']:.1f}",
            file=sys.stderr,
            flush=True,
        )
        if args.json is not None:
            # Rewritten after every row so that a long run leaves its finished rows behind.
            atomic_write_json(args.json, rows, indent=2)
    print(
        f"Training step = training_outputs -> sampled softmax ({args.negatives} negatives) -> backward -> clip -> "
        f"AdamW; {args.layers} layers, d={args.dim}, {args.heads} heads, random full-length batches; {device}, "
        f"{threads or 'default'} threads, OMP_WAIT_POLICY {policy}. GFLOP: matmul FLOPs over allowed attention "
        "pairs (fwd + bwd = 3x fwd); matmul peak = 2048^3 fp32 torch.mm measured before each row.\n"
    )
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

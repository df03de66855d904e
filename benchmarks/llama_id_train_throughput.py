"""Training-step throughput of LLaMA-ID (a Hugging Face Llama as the user model) with and without experts.

The step is the trainer's, as in `benchmarks/train_throughput.py` (training_outputs -> sampled softmax ->
backward -> clip -> AdamW). Paths, all built in the same run and timed interleaved (median of the runs) so that
load from other processes hits every path alike:

- LLaMA-ID, the built-in Llama of `--model LLaMAID` (4 layers, width 256, 4 heads, MLP 1024 by default), plain
  causal over the window and with k expert tokens after P history items, each with transformers' gradient
  checkpointing off and on (`HFDecoderBackbone.set_gradient_checkpointing`);
- HSTU of the same depth, width and heads, plain and with the same experts: the baseline of the ratios;
- with `--smollm2`, LLaMA-ID with SmolLM2-135M's decoder shape (30 layers, width 576, 9 heads / 3 key/value
  heads, MLP 1536), random weights from a config.json-only `--user_pretrain_dir`, with experts, at a small
  batch, checkpointing off and on.

Ratios against HSTU use seq/s on the process's CPU clock (`seq_per_cpu_s`), which other processes' load does
not inflate; wall-clock seq/s, the load average and the share of the asked-for CPU the process got are in every
row. Step memory is what one step adds to the resident set (activations and gradients; all paths' models stay
resident). FLOPs as in train_throughput.py (matmuls only, backward = 2 x forward; the recomputation of checkpointing
not counted, so its GFLOP/s is the useful rate).

    python -m benchmarks.llama_id_train_throughput --threads 1 --json llama_id.json
    python -m benchmarks.llama_id_train_throughput --threads 1 --smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.train_throughput import (
    PeakMemory,
    RowSpec,
    Trainee,
    allowed_pairs,
    build_trainee,
    matmul_peak,
    step_flops,
    time_paths,
)
from persrec.atomic import atomic_write_json
from persrec.config import Config
from persrec.timing import format_figure

# SmolLM2-135M's decoder (from its config.json), built with random weights.
SMOLLM2_135M_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "vocab_size": 2,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class PathSpec:
    """One timed path: the shape of its batch, gradient checkpointing, and where its user model comes from."""

    name: str
    shape: RowSpec
    checkpointing: bool = False
    user_pretrain_dir: str | None = None
    baseline: str | None = None  # the HSTU path its ratio is taken against

    def config(self) -> Config:
        config = self.shape.config()
        if self.user_pretrain_dir is None:
            return config
        return replace(config, user_pretrain_dir=self.user_pretrain_dir)


def path_specs(args: argparse.Namespace, smollm2_dir: str | None) -> list[PathSpec]:
    """HSTU and LLaMA-ID, plain and with experts; LLaMA-ID with checkpointing off and on; SmolLM2 optional."""
    common = {"layers": args.layers, "dim": args.dim, "heads": args.heads, "negatives": args.negatives}
    common |= {"items": args.items, "batch": args.batch}
    experts = {"experts": args.tokens, "history": args.history}
    paths: list[PathSpec] = []
    for label, extra in (("plain", {}), ("experts", experts)):
        hstu = f"HSTU {label}"
        paths.append(PathSpec(hstu, RowSpec("HSTU", args.window, **common, **extra)))
        for checkpointing in (False, True):
            name = f"LLaMAID {label}" + (" ckpt" if checkpointing else "")
            shape = RowSpec("LLaMAID", args.window, **common, **extra)
            paths.append(PathSpec(name, shape, checkpointing, baseline=hstu))
    if smollm2_dir is not None:
        big = {**common, **experts, "layers": 30, "dim": 576, "heads": 9, "batch": args.smollm2_batch}
        for checkpointing in (False, True):
            name = "LLaMAID SmolLM2-135M experts" + (" ckpt" if checkpointing else "")
            shape = RowSpec("LLaMAID", args.window, **big)
            paths.append(PathSpec(name, shape, checkpointing, smollm2_dir))
    return paths


def build_path(path: PathSpec, device: torch.device) -> Trainee:
    trainee = build_trainee(path.shape, device, config=path.config())
    if path.checkpointing:
        trainee.model.backbone.set_gradient_checkpointing(True)
    return trainee


def resident_mb() -> float:
    """The process's current resident set (VmRSS), in MiB; 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def step_memory_mb(trainee: Trainee, device: torch.device) -> float:
    """Memory one step adds on top of what is resident before it (activations, the ones checkpointing
    drops, and gradients): every path's model stays resident, so the process-wide peak alone would not tell
    paths apart. CUDA: the allocator's peak over the step minus what was allocated before."""
    memory = PeakMemory(device)
    memory.reset()
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else resident_mb()
    trainee.step()
    return memory.read_mb() - before


def run(
    paths: list[PathSpec], device: torch.device, repeats: int, budget_s: float
) -> list[dict[str, object]]:
    """Time every path interleaved; one record per path, with ratios against its HSTU baseline."""
    load_start = os.getloadavg()[0]
    peak = matmul_peak(device)
    trainees = {path.name: build_path(path, device) for path in paths}
    samples, _, share = time_paths(trainees, device, repeats, budget_s)
    step_memory = {name: step_memory_mb(trainee, device) for name, trainee in trainees.items()}
    load_end = os.getloadavg()[0]
    rows: dict[str, dict[str, object]] = {}
    for path in paths:
        spec = path.shape
        decoder = getattr(trainees[path.name].model.backbone, "decoder", None)
        flops = sum(step_flops(trainees[path.name].model, spec, allowed_pairs(spec)).values())
        wall = statistics.median(w for w, _ in samples[path.name])
        cpu = statistics.median(c for _, c in samples[path.name])
        rows[path.name] = {
            "path": path.name,
            "model": spec.model,
            "architecture": None if decoder is None else decoder.config.model_type,
            "seq_len": spec.seq_len,
            "experts": spec.experts,
            "history": spec.history,
            "recent": spec.seq_len - spec.history if spec.experts else None,
            "batch": spec.batch,
            "layers": spec.layers,
            "dim": spec.dim,
            "heads": spec.heads,
            "kv_heads": None if decoder is None else decoder.config.num_key_value_heads,
            "intermediate": None if decoder is None else decoder.config.intermediate_size,
            "items": spec.items,
            "negatives": spec.negatives,
            "gradient_checkpointing": path.checkpointing,
            "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else 0,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "step_ms": wall * 1e3,
            "seq_per_s": spec.batch / wall,
            "cpu_ms": cpu * 1e3,
            "seq_per_cpu_s": spec.batch / cpu,
            "step_mem_mb": step_memory[path.name],
            "gflop": flops / 1e9,
            "gflop_per_cpu_s": flops / cpu / 1e9,
            "peak_gflop_per_s": peak / 1e9,
            "runs": len(samples[path.name]),
            "step_ms_all": [w * 1e3 for w, _ in samples[path.name]],
            "baseline": path.baseline,
            "cpu_share": share,
            "load_1m_start": load_start,
            "load_1m_end": load_end,
        }
    for row in rows.values():
        base = rows.get(row["baseline"]) if row["baseline"] else None
        row["vs_baseline_cpu"] = None if base is None else row["seq_per_cpu_s"] / base["seq_per_cpu_s"]
        row["vs_baseline_wall"] = None if base is None else row["seq_per_s"] / base["seq_per_s"]
    return list(rows.values())


def markdown(rows: list[dict[str, object]]) -> str:
    columns = [
        ("path", lambda r: r["path"]),
        ("L (+k)", lambda r: f"{r['seq_len']}" + (f" (+{r['experts']})" if r["experts"] else "")),
        ("batch", lambda r: r["batch"]),
        ("seq/s", lambda r: format_figure(r["seq_per_s"])),
        ("seq/CPU-s", lambda r: format_figure(r["seq_per_cpu_s"])),
        ("CPU ms/step", lambda r: format_figure(r["cpu_ms"])),
        ("step mem MB", lambda r: f"{r['step_mem_mb']:,.0f}"),
        ("GFLOP/step", lambda r: format_figure(r["gflop"])),
        ("GFLOP/CPU-s", lambda r: format_figure(r["gflop_per_cpu_s"])),
        (
            "vs HSTU (CPU clock)",
            lambda r: "-" if r["vs_baseline_cpu"] is None else f"{r['vs_baseline_cpu']:.2f}x",
        ),
        ("cpu share", lambda r: f"{r['cpu_share']:.2f}"),
        ("load 1m", lambda r: f"{r['load_1m_start']:.1f}-{r['load_1m_end']:.1f}"),
    ]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(get(row)) for _, get in columns) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=200, help="items per sequence")
    p.add_argument("--history", type=int, default=160, help="P: history items before the experts")
    p.add_argument("--tokens", type=int, default=4, help="expert tokens k")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--items", type=int, default=3706, help="catalogue size (MovieLens-1M's)")
    p.add_argument("--negatives", type=int, default=512, help="sampled negatives shared by the batch")
    p.add_argument("--smollm2", action="store_true", help="add the SmolLM2-135M-shaped rows")
    p.add_argument("--smollm2-batch", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=5, help="most timed steps per path")
    p.add_argument("--budget-s", type=float, default=20.0, help="timing budget per path")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as a JSON list of objects")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch sees no CUDA device")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    print(f"device {device} ({threads} threads), torch {torch.__version__}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        smollm2_dir = None
        if args.smollm2:
            (Path(scratch) / "config.json").write_text(json.dumps(SMOLLM2_135M_CONFIG))
            smollm2_dir = scratch
        rows = run(path_specs(args, smollm2_dir), device, args.repeats, args.budget_s)
    if args.json is not None:
        atomic_write_json(args.json, rows, indent=2)
    print(
        f"Training step = training_outputs -> sampled softmax ({args.negatives} negatives) -> backward -> clip -> "
        f"AdamW; window {args.window} (experts: P={args.history}, R={args.window - args.history}, "
        f"k={args.tokens}), {args.layers} layers, d={args.dim}, {args.heads} heads, random init; {device}, "
        f"{threads or 'default'} threads. Ratios on the CPU clock against HSTU of the same size.\n"
    )
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""persrec's HSTU against the plain-PyTorch HSTU of meta-recsys/generative-recommenders, same weights.

The reference is imported from a checkout given with --reference, never copied into persrec:

    git clone https://github.com/meta-recsys/generative-recommenders
    python benchmarks/hstu_reference_compare.py --reference generative-recommenders --json out.json

Only its research model files are imported (`generative_recommenders/research/modeling/sequential/hstu.py`
and the modules it imports: embedding, input preprocessor, output postprocessor, similarity base), which need
nothing beyond torch, except three FBGEMM operators they call through `torch.ops.fbgemm`
(`asynchronous_complete_cumsum`, `jagged_to_padded_dense`, `dense_to_jagged`). Where `fbgemm_gpu` imports and
provides them, they are used as they are; otherwise (no FBGEMM wheel matches every torch build) this script
registers plain PyTorch versions under the same names for its own process. Those versions turn a batch of
full-length sequences, the only kind timed here, into reshapes without a copy, so they can only make the
reference faster than FBGEMM's copying kernels would. gin, the reference's data and training code are not
needed.

Both models are built for each setting with the reference's parameters copied into persrec's
(`map_reference_weights`: item and position tables, the fused uvqk projection as a Linear with a zero bias,
the output projection, each layer's relative position and time-bucket tables, the reference's LayerNorm eps),
and their L2-normalised outputs are checked to agree before anything is timed. The reference has no cache of
key/values for a fixed-normaliser model and attends over one causal [N, N] mask; persrec runs its default
path (`attention_implementation=auto`: the fused C kernel for heads up to 32 wide, the tiled path otherwise).
The agreement check uses equal timestamps for every item: the reference buckets time gaps as
log(gap) / 0.301 against the next item's timestamp, persrec as log2(gap) against the query's own, so only
zero gaps fall in the same bucket (0) under both; the timed runs use increasing random timestamps, for which
both do the same work.

Rows (the reference's ML-1M configurations and the authors' long-sequence PerSRec setting), each timed for a
training step (forward in train mode with dropout 0.2, a fixed random linear functional of the outputs,
backward) and for inference (eval mode under `torch.inference_mode`, forward only):

- ML-1M HSTU: 2 layers, 1 head of 50, d=50, L=200, batch 128, relative position + time bias;
- HSTU-large: 8 layers, 2 heads of 25, d=50, L=200, batch 128, same bias;
- long: 16 layers, 8 heads of 8, d=64, L=1024, batch 4, same bias.

`--no-relative-bias` runs the same rows with neither model applying a relative bias.

Paths are timed interleaved (reference, persrec, persrec, reference, ...: the order flips every round) and
the ratio is the reference's median time over persrec's (above 1: persrec is faster), on the wall clock and
on the process CPU clock, which other processes' load does not inflate. `--quick` shrinks the batches (32, 32,
2) and the number of rounds, for a check in a minute or two.

    python benchmarks/hstu_reference_compare.py --reference ../generative-recommenders --quick

On a machine shared with other jobs set `OMP_WAIT_POLICY=PASSIVE`: with OpenMP's default spin-waiting, code
made of many small parallel operations (persrec's tiled attention path) stalls at every barrier while a core
is taken, which measures the load rather than either model (the policy is recorded in every row).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from persrec.atomic import atomic_write_json
from persrec.models.base import BackboneConfig
from persrec.models.hstu import HSTU
from persrec.timing import medians, timed_call

REFERENCE_URL = "https://github.com/meta-recsys/generative-recommenders"
REFERENCE_MODULE = "generative_recommenders.research.modeling.sequential"
# The reference's RelativeBucketedTimeAndPositionBasedBias is built with 128 time buckets.
TIME_BUCKETS = 128
DROPOUT = 0.2
# Outputs are unit vectors; float32 rounding over 16 layers stays far below this.
AGREEMENT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Setting:
    """One model shape and batch; `heads * head_dim` is the embedding width, as in the reference's configs."""

    name: str
    layers: int
    heads: int
    head_dim: int
    length: int
    batch: int
    items: int = 3706  # MovieLens-1M's catalogue
    seed: int = 0
    relative_bias: bool = True  # relative position + time bias (the reference's default)

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


SETTINGS = (
    Setting("ML-1M HSTU", layers=2, heads=1, head_dim=50, length=200, batch=128),
    Setting("HSTU-large", layers=8, heads=2, head_dim=25, length=200, batch=128),
    Setting("long (16 layers, d=64)", layers=16, heads=8, head_dim=8, length=1024, batch=4),
)
QUICK_BATCHES = (32, 32, 2)


def settings(quick: bool, relative_bias: bool = True) -> list[Setting]:
    """The three rows; with `quick`, smaller batches of the same shapes."""
    rows = [replace(setting, relative_bias=relative_bias) for setting in SETTINGS]
    if not quick:
        return rows
    return [replace(setting, batch=batch) for setting, batch in zip(rows, QUICK_BATCHES, strict=True)]


# ---- the reference's FBGEMM operators, in plain PyTorch -----------------------------------------------------
def complete_cumsum(lengths: Tensor) -> Tensor:
    """[B] lengths -> [B + 1] offsets starting at 0 (FBGEMM's asynchronous_complete_cumsum)."""
    return F.pad(lengths.cumsum(0), (1, 0))


def _rows(offsets: Tensor, max_length: int) -> tuple[Tensor, Tensor]:
    """Per padded slot [B, N]: whether it holds a value, and the index of that value in the jagged rows."""
    starts, lengths = offsets[:-1], (offsets[1:] - offsets[:-1]).clamp(max=max_length)
    slots = torch.arange(max_length, device=offsets.device)
    return slots[None, :] < lengths[:, None], starts[:, None] + slots[None, :]


def jagged_to_padded_dense(
    values: Tensor, offsets: list[Tensor], max_lengths: list[int], padding_value: float = 0.0
) -> Tensor:
    """[sum(lengths), D] -> [B, N, D]: each sequence's rows, truncated or padded to N (one jagged dimension)."""
    (offset,), (length,) = offsets, max_lengths
    batch = offset.shape[0] - 1
    if values.shape[0] == batch * length and bool((offset == torch.arange(batch + 1) * length).all()):
        return values.reshape(batch, length, *values.shape[1:])
    present, index = _rows(offset, int(length))
    out = values.new_full((batch, int(length), *values.shape[1:]), padding_value)
    out[present] = values[index[present]]
    return out


def dense_to_jagged(
    dense: Tensor, offsets: list[Tensor], total_L: int | None = None
) -> tuple[Tensor, list[Tensor]]:  # noqa: N803
    """[B, N, D] -> ([sum(lengths), D], offsets): the first length rows of each sequence, concatenated."""
    (offset,) = offsets
    batch, length = dense.shape[:2]
    if bool((offset == torch.arange(batch + 1) * length).all()):
        return dense.reshape(batch * length, *dense.shape[2:]), offsets
    present, _ = _rows(offset, length)
    return dense[present], offsets


def install_fbgemm_operators() -> str:
    """Make the three operators the reference calls available; returns where they come from."""
    try:
        import fbgemm_gpu  # noqa: F401

        torch.ops.fbgemm.jagged_to_padded_dense  # noqa: B018
        return "fbgemm_gpu"
    except (ImportError, OSError, AttributeError, RuntimeError):
        pass
    namespace = torch.ops.fbgemm
    namespace.asynchronous_complete_cumsum = complete_cumsum
    namespace.jagged_to_padded_dense = jagged_to_padded_dense
    namespace.dense_to_jagged = dense_to_jagged
    return "plain PyTorch (this script)"


def load_reference(path: Path) -> tuple[ModuleType, str]:
    """The reference's plain-PyTorch HSTU package modules, imported from a checkout at `path`."""
    package = path / "generative_recommenders" / "research" / "modeling" / "sequential" / "hstu.py"
    if not package.is_file():
        raise SystemExit(
            f"{path} is not a checkout of generative-recommenders (no {package.relative_to(path)}); "
            f"get one with: git clone {REFERENCE_URL}"
        )
    operators = install_fbgemm_operators()
    sys.path.insert(0, str(path.resolve()))
    modules = {
        name: importlib.import_module(f"{REFERENCE_MODULE}.{name}")
        for name in ("hstu", "embedding_modules", "input_features_preprocessors", "output_postprocessors")
    }
    reference = ModuleType("reference")
    reference.__dict__.update(modules)
    return reference, operators


# ---- the two models on the same weights ---------------------------------------------------------------------
def build_reference(reference: ModuleType, setting: Setting) -> nn.Module:
    """The reference HSTU as its ML-1M configs build it (uvqk, SiLU, rel_bias normalisation, L2 output)."""
    seq = reference
    embedding = seq.embedding_modules.LocalEmbeddingModule(setting.items, setting.dim)
    model = seq.hstu.HSTU(
        max_sequence_len=setting.length,
        max_output_len=0,
        embedding_dim=setting.dim,
        num_blocks=setting.layers,
        num_heads=setting.heads,
        linear_dim=setting.head_dim,
        attention_dim=setting.head_dim,
        normalization="rel_bias",
        linear_config="uvqk",
        linear_activation="silu",
        linear_dropout_rate=DROPOUT,
        attn_dropout_rate=0.0,
        embedding_module=embedding,
        similarity_module=None,
        input_features_preproc_module=seq.input_features_preprocessors.LearnablePositionalEmbeddingInputFeaturesPreprocessor(
            setting.length, setting.dim, DROPOUT
        ),
        output_postproc_module=seq.output_postprocessors.L2NormEmbeddingPostprocessor(setting.dim, 1e-6),
        # Its pointwise attention requires the bias module; given no timestamps it applies none.
        enable_relative_attention_bias=True,
        verbose=False,
    )
    return model


def build_persrec(setting: Setting) -> HSTU:
    """persrec's HSTU of the same shape (positions = the reference's N, so both normalise by N)."""
    config = BackboneConfig(
        num_items=setting.items,
        max_positions=setting.length,
        embedding_dim=setting.dim,
        num_layers=setting.layers,
        num_heads=setting.heads,
        dropout=DROPOUT,
        qk_dim=setting.head_dim,
        v_dim=setting.head_dim,
        relative_position_bias=setting.relative_bias,
        relative_time_bias=setting.relative_bias,
        time_buckets=TIME_BUCKETS,
    )
    return HSTU(config)


@torch.no_grad()
def map_reference_weights(reference: nn.Module, ours: HSTU) -> None:
    """Copy every parameter of the reference HSTU into persrec's (see the module docstring for the map)."""
    ours.item_embedding.weight.copy_(reference._embedding_module._item_emb.weight)
    ours.position_embedding.weight.copy_(reference._input_features_preproc._pos_emb.weight)
    for theirs, layer in zip(reference._hstu._attention_layers, ours.layers, strict=True):
        layer.uvqk.weight.copy_(theirs._uvqk.T)
        layer.uvqk.bias.zero_()
        layer.output.weight.copy_(theirs._o.weight)
        layer.output.bias.copy_(theirs._o.bias)
        if layer.relative_bias is not None:
            layer.relative_bias.position_bias.copy_(theirs._rel_attn_bias._pos_w)
            layer.relative_bias.time_bias.copy_(theirs._rel_attn_bias._ts_w)
        for norm in (layer.input_norm, layer.attention_norm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
            norm.eps = theirs._eps  # the reference normalises without affine parameters, eps 1e-6


@dataclass
class Batch:
    ids: Tensor  # [B, N] item ids, all valid
    lengths: Tensor  # [B]
    timestamps: Tensor | None  # [B, N] int64, non-decreasing; None without relative bias


def make_batch(setting: Setting, constant_times: bool = False) -> Batch:
    gen = torch.Generator().manual_seed(setting.seed + 1)
    shape = (setting.batch, setting.length)
    ids = torch.randint(1, setting.items + 1, shape, generator=gen)
    lengths = torch.full((setting.batch,), setting.length)
    if not setting.relative_bias:
        return Batch(ids, lengths, None)  # the reference applies no bias when given no timestamps
    if constant_times:
        times = torch.full(shape, 1_000_000_000, dtype=torch.int64)
    else:
        gaps = torch.randint(0, 200_000, shape, generator=gen)
        times = 1_000_000_000 + gaps.cumsum(1)
    return Batch(ids, lengths, times)


def reference_forward(model: nn.Module, batch: Batch) -> Tensor:
    """L2-normalised outputs [B, N, D] of the reference, as its training loop calls it."""
    embeddings = model.get_item_embeddings(batch.ids)
    payloads = {} if batch.timestamps is None else {"timestamps": batch.timestamps}
    return model(batch.lengths, batch.ids, embeddings, payloads)


def persrec_forward(model: HSTU, batch: Batch) -> Tensor:
    """persrec's hidden states [B, N, D], L2-normalised as the reference's output postprocessor does."""
    return F.normalize(model(batch.ids, batch.timestamps), dim=-1, eps=1e-6)


def max_abs_difference(reference: nn.Module, ours: HSTU, setting: Setting) -> float:
    """Largest output difference in eval mode on a batch with equal timestamps (see the module docstring)."""
    batch = make_batch(setting, constant_times=True)
    reference.eval(), ours.eval()
    with torch.inference_mode():
        return (reference_forward(reference, batch) - persrec_forward(ours, batch)).abs().max().item()


def train_step(forward: Callable[[], Tensor], model: nn.Module, weight: Tensor) -> Callable[[], None]:
    """One forward in train mode and the backward of a fixed linear functional of the outputs."""

    def step() -> None:
        model.train()
        for p in model.parameters():
            p.grad = None
        (forward() * weight).sum().backward()

    return step


def inference_step(forward: Callable[[], Tensor], model: nn.Module) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.inference_mode():
            forward()

    return step


# ---- timing ---------------------------------------------------------------------------------------------------
def time_interleaved(
    paths: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, list[tuple[float, float | None]]]:
    """`rounds` timed calls per path after one warm-up each, in an order that flips every round (A B, B A,
    ...), so that a load burst or a cache left warm by the previous path favours neither."""
    names = list(paths)
    for name in names:
        paths[name]()
    samples: dict[str, list[tuple[float, float | None]]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            samples[name].append(timed_call(paths[name], device))
    return samples


def ratios(samples: dict[str, list[tuple[float, float | None]]]) -> dict[str, float | None]:
    """Median times in ms and the reference / persrec ratios (wall and CPU) of one mode."""
    ref_wall, ref_cpu = medians(samples["reference"])
    our_wall, our_cpu = medians(samples["persrec"])
    return {
        "reference_ms": ref_wall * 1e3,
        "persrec_ms": our_wall * 1e3,
        "reference_cpu_ms": None if ref_cpu is None else ref_cpu * 1e3,
        "persrec_cpu_ms": None if our_cpu is None else our_cpu * 1e3,
        "ratio": ref_wall / our_wall,
        "ratio_cpu": None if ref_cpu is None or our_cpu is None else ref_cpu / our_cpu,
    }


def run_setting(
    reference: ModuleType, setting: Setting, rounds: int, device: torch.device
) -> dict[str, object]:
    """Build both models on the same weights, check they agree, time training and inference interleaved."""
    torch.manual_seed(setting.seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints every initialised parameter
        theirs = build_reference(reference, setting).to(device)
    ours = build_persrec(setting).to(device)
    map_reference_weights(theirs, ours)
    difference = max_abs_difference(theirs, ours, setting)
    if not difference <= AGREEMENT_TOLERANCE:
        raise RuntimeError(f"{setting.name}: outputs differ by {difference:.3g} after mapping the weights")
    batch = make_batch(setting)
    weight = torch.randn(
        setting.batch, setting.length, setting.dim, generator=torch.Generator().manual_seed(7)
    )
    load_start, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    row: dict[str, object] = {
        "setting": setting.name,
        "layers": setting.layers,
        "heads": setting.heads,
        "head_dim": setting.head_dim,
        "dim": setting.dim,
        "length": setting.length,
        "batch": setting.batch,
        "relative_bias": setting.relative_bias,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "rounds": rounds,
        "max_abs_diff": difference,
    }
    for mode in ("train", "inference"):
        if mode == "train":
            paths = {
                "reference": train_step(lambda: reference_forward(theirs, batch), theirs, weight),
                "persrec": train_step(lambda: persrec_forward(ours, batch), ours, weight),
            }
        else:
            paths = {
                "reference": inference_step(lambda: reference_forward(theirs, batch), theirs),
                "persrec": inference_step(lambda: persrec_forward(ours, batch), ours),
            }
        samples = time_interleaved(paths, rounds, device)
        row[mode] = ratios(samples)
        row[f"{mode}_samples_ms"] = {name: [w * 1e3 for w, _ in values] for name, values in samples.items()}
    threads = torch.get_num_threads()
    row["cpu_share"] = (time.process_time() - cpu) / (time.perf_counter() - wall) / threads
    row["load_1m_start"], row["load_1m_end"] = load_start, os.getloadavg()[0]
    return row


def markdown(rows: list[dict[str, object]]) -> str:
    """The table: per setting, train and inference times and ratios reference / persrec."""
    lines = [
        "| setting | bias | batch | train ref ms | train persrec ms | train ratio (CPU) | "
        "inference ref ms | inference persrec ms | inference ratio (CPU) | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [str(row["setting"]), "on" if row["relative_bias"] else "off", str(row["batch"])]
        for mode in ("train", "inference"):
            r = row[mode]
            cpu = "" if r["ratio_cpu"] is None else f" ({r['ratio_cpu']:.2f}x)"
            cells += [f"{r['reference_ms']:,.1f}", f"{r['persrec_ms']:,.1f}", f"{r['ratio']:.2f}x{cpu}"]
        cells.append(f"{row['max_abs_diff']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextmanager
def threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=f"Get the reference with: git clone {REFERENCE_URL}",
    )
    p.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="a checkout of generative-recommenders (its plain-PyTorch HSTU is imported from there)",
    )
    p.add_argument("--quick", action="store_true", help="smaller batches and fewer rounds")
    p.add_argument(
        "--no-relative-bias",
        action="store_true",
        help="both models without the relative position + time bias (the reference then gets no timestamps)",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="timed calls per path and mode (default 7, quick 3)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch's default)")
    p.add_argument(
        "--settings", nargs="+", type=int, default=None, help="row numbers to run (1-3; default all)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the rows as a JSON list of objects")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reference, operators = load_reference(args.reference)
    rounds = args.rounds or (3 if args.quick else 7)
    chosen = settings(args.quick, relative_bias=not args.no_relative_bias)
    if args.settings:
        chosen = [chosen[index - 1] for index in args.settings]
    device = torch.device("cpu")
    rows = []
    with threads(args.threads):
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, FBGEMM ops: {operators}",
            file=sys.stderr,
        )
        for setting in chosen:
            row = run_setting(reference, setting, rounds, device)
            row["fbgemm_operators"] = operators
            rows.append(row)
            print(
                f"{setting.name}: train {row['train']['ratio']:.2f}x, inference {row['inference']['ratio']:.2f}x "
                f"(max abs diff {row['max_abs_diff']:.1e}, cpu share {row['cpu_share']:.2f})",
                file=sys.stderr,
                flush=True,
            )
            if args.json is not None:
                atomic_write_json(args.json, rows, indent=2)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

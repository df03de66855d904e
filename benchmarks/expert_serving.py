"""Serving latency: full-sequence inference against expert-cache inference (PerSRec, DESIGN §1 "Serving").

For each backbone, total history N (R = N/5 recent items, P = N - R history items, k expert tokens) and request
batch, one randomly initialised model (eval mode, inference mode) is timed on the same weights as:

- full:     the plain backbone over the N most recent items; the last position's hidden state is scored
            against every item of the catalogue;
- cached:   ``predict_hidden(cache, recent)`` over the R recent items with the expert cache already built,
            scored the same way (the per-request cost of the method);
- compress: building that cache from the P history items (one-off per user, or per completed segment);
- one-item: a cached request with a single recent item (the part of a request that does not shrink with R);
- SASRec and LLaMAID only, full through SDPA's causal kernel instead of the explicit mask the backbone always
  passes (LLaMAID: the decoder without an attention mask, which transformers runs with `is_causal`).

LLaMAID rows (`--backbones LLaMAID`) run a Hugging Face Llama of SmolLM2-135M's shape (30 layers, width 576, 9
heads with 3 key/value heads, gated MLP of 1536, rope theta 100,000) with random weights over item-ID embeddings
of its own width, through `persrec.models.hf_decoder.HFDecoderBackbone`: nothing is downloaded.

Next to the times: analytic FLOPs (linear layers + attention; attention counted over the pairs the causal /
expert mask allows), the roofline time (FLOPs / fp32 matmul peak measured in the same run with the same
threads, re-measured before every row), the time of the attention kernel alone (one layer's call captured
from a real request and replayed, x layers: where the time goes, against attention's share of the FLOPs), and
the largest score difference between the cached path and the full masked expert forward. Paths are timed interleaved (median of the runs) so that load
from other processes hits all of them alike; the load average and the share of the asked-for threads the
process got are part of every row.

    python benchmarks/expert_serving.py --quick
    python benchmarks/expert_serving.py --json serving.json
    python benchmarks/expert_serving.py --device cuda --threads 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor

from persrec.atomic import atomic_write_json
from persrec.flops import layer_flops
from persrec.hf.loading import require_transformers
from persrec.hf.tiny import build_decoder
from persrec.models import BackboneConfig, SequenceBackbone, build_backbone
from persrec.models import hstu as hstu_module
from persrec.models import sasrec as sasrec_module
from persrec.models.experts import ExpertLayout, ExpertSequenceModel
from persrec.models.hf_decoder import HFDecoderBackbone
from persrec.models.hstu import HSTULayer
from persrec.models.sasrec import SASRec
from persrec.timing import format_figure, matmul_rate, medians, timed_call

BACKBONES = ("HSTU", "SASRec", "LLaMAID")
# What runs without --backbones.
DEFAULT_BACKBONES = ("HSTU", "SASRec")
# Shape of persrec's own backbones unless --layers/--dim/--heads say otherwise.
NATIVE_SHAPE = {"layers": 16, "dim": 64, "heads": 8, "kv_heads": None, "intermediate": None}
# SmolLM2-135M's decoder (its config.json), the user model of the LLaMAID rows.
SMOLLM2_135M_SHAPE = {"layers": 30, "dim": 576, "heads": 9, "kv_heads": 3, "intermediate": 1536}
SMOLLM2_ROPE_THETA = 100_000.0
SMOLLM2_RMS_NORM_EPS = 1e-5
SMOLLM2_MAX_POSITIONS = 8192
LENGTHS = (320, 640, 1280, 2560)
BATCHES = (1, 64)
# A warm-up run longer than this is kept as a sample: first-call costs are noise against it.
LONG_RUN_S = 3.0
# A path whose single run takes longer than this is run once (batch 64 at N = 2560 runs for minutes).
VERY_LONG_RUN_S = 30.0


@dataclass(frozen=True)
class RowSpec:
    """One table row: model shape, history split and request batch."""

    backbone: str
    history: int  # N: items per request
    batch: int
    tokens: int = 4  # k
    recent_fraction: float = 0.2  # R = round(N * fraction)
    layers: int = 16
    dim: int = 64
    heads: int = 8
    items: int = 10_000
    seed: int = 0
    kv_heads: int | None = None  # LLaMAID: key/value heads (None = heads)
    intermediate: int | None = None  # LLaMAID: gated MLP width (None = 4 x dim)

    @property
    def recent(self) -> int:
        return max(1, round(self.history * self.recent_fraction))

    @property
    def pretrain(self) -> int:
        return self.history - self.recent


@dataclass
class Machine:
    """Reference rates measured in the same run, so that rooflines share the run's load and threads."""

    device: torch.device
    threads: int
    matmul_flops: float  # fp32 FLOP/s of a large torch.mm, on the CPU clock (wall on CUDA)
    matmul_flops_wall: float  # the same on the wall clock (lower than the above under load)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch sees no CUDA device")
    return torch.device(name)


def measure_machine(device: torch.device, threads: int) -> Machine:
    """fp32 matmul peak: the median of a few large square torch.mm calls.

    On a CPU the peak is taken on the process's CPU clock: other processes' load then inflates neither the
    roofline nor the CPU-time columns it is compared with (on an idle core both clocks agree).
    """
    wall_rate, cpu_rate = matmul_rate(device, 8192 if device.type == "cuda" else 2048, runs=7)
    return Machine(device, threads, cpu_rate or wall_rate, wall_rate)


def time_paths(
    paths: dict[str, Callable[[], object]], device: torch.device, repeats: int, budget_s: float
) -> tuple[dict[str, list[tuple[float, float | None]]], float]:
    """(wall, CPU) seconds per call of every path, and the share of the asked-for threads the process got.

    Each path is warmed up once and then gets as many runs as fit in `budget_s` (at least 2 samples, or just
    the warm-up run when that took over VERY_LONG_RUN_S; at most `repeats`). Runs are interleaved evenly across paths, so a burst of load from other processes lands on
    all of them instead of on whichever path happened to be running.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    samples: dict[str, list[tuple[float, float | None]]] = {name: [] for name in paths}
    extra: dict[str, int] = {}
    for name, fn in paths.items():
        first = timed_call(fn, device)
        if first[0] > LONG_RUN_S:
            samples[name].append(first)
        least = 1 if first[0] > VERY_LONG_RUN_S else 2
        wanted = min(repeats, max(least, int(budget_s / max(first[0], 1e-9))))
        extra[name] = wanted - len(samples[name])
    rounds = max(extra.values())
    for index in range(rounds):  # no rounds when every path is down to its warm-up run
        for name, fn in paths.items():
            # Spread a path's runs evenly over the rounds (Bresenham-style).
            if (index + 1) * extra[name] // rounds > index * extra[name] // rounds:
                samples[name].append(timed_call(fn, device))
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    share = (time.process_time() - cpu) / (time.perf_counter() - wall) / threads
    return samples, share


def flop_counts(backbone: SequenceBackbone, layout: ExpertLayout, batch: int) -> dict[str, float]:
    """Analytic FLOPs of one request per path, and the attention-score count (heads x allowed pairs).

    Linear layers count 2·in·out per token; attention 2·(qk width + v width) per allowed (query, key) pair.
    Norms, embeddings and pointwise functions (SiLU, softmax) are not counted. Both request paths include
    scoring the last position against the whole item table. `<path>_attention` is the attention part alone.
    """
    block = layer_flops(backbone)
    linear, per_pair, depth = block.linear, block.per_pair, block.depth
    scoring = 2 * backbone.dim * backbone.all_item_embeddings().shape[0]
    mask = layout.slot_tables["mask"]
    window, history, tokens = layout.window, layout.history_length, layout.num_tokens
    recent = window - history
    pairs = {
        "full": window * (window + 1) // 2,
        "cached": int(mask[-recent:].sum()),
        "compress": int(mask[: history + tokens, : history + tokens].sum()),
    }
    rows = {"full": window, "cached": recent, "compress": history + tokens}
    counts: dict[str, float] = {}
    for path, tokens_run in rows.items():
        stack = depth * (tokens_run * linear + pairs[path] * per_pair)
        counts[path] = batch * (stack + (0 if path == "compress" else scoring))
        counts[f"{path}_attention"] = batch * depth * pairs[path] * per_pair
    return counts


def _attention_entry(backbone: SequenceBackbone) -> tuple[object, str]:
    """(namespace, name) of the function a backbone's layers call for attention, looked up at call time.

    transformers' sdpa kernel calls `torch.nn.functional.scaled_dot_product_attention` at call time too."""
    if isinstance(backbone, HFDecoderBackbone):
        return F, "scaled_dot_product_attention"
    if isinstance(backbone.layers[0], HSTULayer):
        return hstu_module, "hstu_attention"
    if hasattr(sasrec_module, "masked_attention"):
        return sasrec_module, "masked_attention"
    return F, "scaled_dot_product_attention"


def replay_attention(backbone: SequenceBackbone, run: Callable[[], object]) -> Callable[[], object] | None:
    """Run `run` once, record every attention call the backbone's layers make, and return a replay of them.

    The replay makes the same calls with the same tensors, strides and masks as inside the model: it times the
    attention of a whole request alone. None when no call was recorded (a backbone calling something else).
    """
    target, attribute = _attention_entry(backbone)
    original = getattr(target, attribute)
    calls: list[tuple[tuple, dict]] = []

    def record(*args: object, **kwargs: object) -> object:
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    with mock.patch.object(target, attribute, record):
        run()
    if not calls:
        return None
    return lambda: [original(*args, **kwargs) for args, kwargs in calls]


def sasrec_causal_hidden(backbone: SASRec, ids: Tensor) -> Tensor:
    """SASRec over an all-valid window through SDPA's causal kernel instead of an explicit boolean mask.

    The same layers and weights as `backbone(ids)`, so the same numbers (checked per row): it measures what the
    plain full path would cost if it skipped the mask when a window has no padding, so that a speedup of the
    cache can be told apart from a slow baseline.
    """
    batch, length = ids.shape
    positions = torch.arange(length, device=ids.device)
    x = backbone.input_embeddings(ids) + backbone.position_embedding(positions)
    for layer in backbone.layers:
        qkv = layer.qkv(layer.attention_norm(x)).view(batch, length, 3, layer.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + layer.output(attended.transpose(1, 2).reshape(batch, length, -1))
        x = x + layer.ffn(layer.ffn_norm(x))
    return backbone.final_norm(x)


def llama_config(spec: RowSpec, max_positions: int) -> object:
    """A transformers LlamaConfig of the row's shape with SmolLM2-135M's rope theta and norm epsilon."""
    transformers = require_transformers()
    return transformers.LlamaConfig(
        hidden_size=spec.dim,
        intermediate_size=spec.intermediate or 4 * spec.dim,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads or spec.heads,
        max_position_embeddings=max(max_positions, SMOLLM2_MAX_POSITIONS),
        rms_norm_eps=SMOLLM2_RMS_NORM_EPS,
        rope_theta=SMOLLM2_ROPE_THETA,
        vocab_size=2,  # the token table is never read: inputs are item vectors
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )


def build_row_backbone(spec: RowSpec, config: BackboneConfig) -> SequenceBackbone:
    """persrec's own backbone of the row, or (LLaMAID) a random-weight Llama over item embeddings of its width."""
    if spec.backbone != "LLaMAID":
        return build_backbone(spec.backbone, config)
    decoder = build_decoder(llama_config(spec, config.max_positions), "sdpa")
    return HFDecoderBackbone(config, decoder)


def hf_causal_hidden(backbone: HFDecoderBackbone, ids: Tensor) -> Tensor:
    """The decoder over an all-valid window without a mask: transformers then calls SDPA's causal kernel
    (and, where SDPA has it, grouped-query attention without repeating keys). Same weights and numbers as
    `backbone(ids)` (checked per row): the fair full baseline, as `sasrec_causal_hidden` is for SASRec."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    inputs = backbone.input_embeddings(ids)
    return backbone.decoder(inputs_embeds=inputs, position_ids=positions, use_cache=False)[0]


def run_row(spec: RowSpec, machine: Machine, repeats: int = 9, budget_s: float = 20.0) -> dict[str, object]:
    """Build the model of `spec`, check the cached scores against the full masked pass, time every path."""
    device = machine.device
    load_start = os.getloadavg()[0]
    torch.manual_seed(spec.seed)
    layout = ExpertLayout(spec.history, ((spec.pretrain, spec.tokens),))
    config = BackboneConfig(
        num_items=spec.items,
        max_positions=layout.length,
        embedding_dim=spec.dim,
        num_layers=spec.layers,
        num_heads=spec.heads,
        dropout=0.0,
    )
    backbone = build_row_backbone(spec, config)
    model = ExpertSequenceModel(backbone, layout).to(device).eval()
    generator = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(1, spec.items + 1, (spec.batch, spec.history), generator=generator).to(device)
    history, recent = ids[:, : spec.pretrain], ids[:, spec.pretrain :]
    table = backbone.all_item_embeddings()

    with torch.inference_mode():
        cache = model.compress(history)

        def full() -> Tensor:
            return backbone(ids)[:, -1] @ table.T

        def cached() -> Tensor:
            return model.predict_hidden(cache, recent)[:, -1] @ table.T

        def one_item() -> Tensor:
            return model.predict_hidden(cache, recent[:, -1:])[:, -1] @ table.T

        def compress() -> object:
            return model.compress(history)

        exact = model.item_hidden_states(ids)[:, -1] @ table.T
        score_diff = (cached() - exact).abs().max().item()
        score_scale = exact.abs().max().item()
        del exact
        paths = {"full": full, "cached": cached, "one_item": one_item, "compress": compress}
        for path, fn in (("full", full), ("cached", cached)):
            replay = replay_attention(backbone, fn)
            if replay is not None:
                paths[f"attention_{path}"] = replay
        causal_diff = None
        causal = {SASRec: sasrec_causal_hidden, HFDecoderBackbone: hf_causal_hidden}
        causal_hidden = next((fn for kind, fn in causal.items() if isinstance(backbone, kind)), None)
        if causal_hidden is not None:

            def full_causal() -> Tensor:
                return causal_hidden(backbone, ids)[:, -1] @ table.T

            causal_diff = (full_causal() - full()).abs().max().item()
            paths["full_causal"] = full_causal
        samples, cpu_share = time_paths(paths, device, repeats, budget_s)

    wall_ms, cpu_ms = {}, {}
    for name, values in samples.items():
        wall, cpu = medians(values)
        wall_ms[name], cpu_ms[name] = wall * 1e3, None if cpu is None else cpu * 1e3
    flops = flop_counts(backbone, layout, spec.batch)
    # CPU-clock figures where there are some (immune to other processes' load), wall-clock ones otherwise.
    work = {name: cpu_ms[name] if cpu_ms[name] is not None else wall_ms[name] for name in samples}
    return {
        "backbone": spec.backbone,
        "N": spec.history,
        "P": spec.pretrain,
        "R": spec.recent,
        "k": spec.tokens,
        "batch": spec.batch,
        "layers": spec.layers,
        "dim": spec.dim,
        "heads": spec.heads,
        "items": spec.items,
        "device": str(device),
        "threads": machine.threads,
        "scoring": "last position against all items, in both paths",
        "full_ms": wall_ms["full"],
        "cached_ms": wall_ms["cached"],
        "compress_ms": wall_ms["compress"],
        "one_item_ms": wall_ms["one_item"],
        "speedup": wall_ms["full"] / wall_ms["cached"],
        "full_rps": spec.batch / wall_ms["full"] * 1e3,
        "cached_rps": spec.batch / wall_ms["cached"] * 1e3,
        "full_cpu_ms": cpu_ms["full"],
        "cached_cpu_ms": cpu_ms["cached"],
        "compress_cpu_ms": cpu_ms["compress"],
        "one_item_cpu_ms": cpu_ms["one_item"],
        "speedup_cpu": None if cpu_ms["full"] is None else cpu_ms["full"] / cpu_ms["cached"],
        "flop_ratio": flops["full"] / flops["cached"],
        "full_gflop": flops["full"] / 1e9,
        "cached_gflop": flops["cached"] / 1e9,
        "compress_gflop": flops["compress"] / 1e9,
        "peak_gflops": machine.matmul_flops / 1e9,
        "peak_wall_gflops": machine.matmul_flops_wall / 1e9,
        "roofline_full_ms": flops["full"] / machine.matmul_flops * 1e3,
        "roofline_cached_ms": flops["cached"] / machine.matmul_flops * 1e3,
        "work_clock": "cpu" if cpu_ms["full"] is not None else "wall",
        "attention_full_work_ms": work.get("attention_full"),
        "attention_cached_work_ms": work.get("attention_cached"),
        "attention_flop_share_full": flops["full_attention"] / flops["full"],
        "attention_flop_share_cached": flops["cached_attention"] / flops["cached"],
        "full_causal_work_ms": work.get("full_causal"),
        "speedup_vs_causal": None if "full_causal" not in work else work["full_causal"] / work["cached"],
        "full_causal_max_abs_diff": causal_diff,
        "max_abs_score_diff": score_diff,
        "max_abs_score": score_scale,
        **hf_shape(backbone),
        "runs": {name: len(values) for name, values in samples.items()},
        "cpu_share": cpu_share,
        "load_1m_start": load_start,
        "load_1m_end": os.getloadavg()[0],
    }


def hf_shape(backbone: SequenceBackbone) -> dict[str, object]:
    """The decoder's shape fields a Hugging Face row adds (none for persrec's own backbones)."""
    if not isinstance(backbone, HFDecoderBackbone):
        return {}
    config = backbone.decoder.config
    return {
        "architecture": config.model_type,
        "kv_heads": config.num_key_value_heads,
        "intermediate": config.intermediate_size,
        "attn_implementation": config._attn_implementation,
    }


def _work(row: dict[str, object], path: str) -> float:
    """A path's time on the row's work clock: CPU time on a CPU (load-independent), wall time on CUDA."""
    cpu = row.get(f"{path}_cpu_ms")
    return cpu if cpu is not None else row[f"{path}_ms"]


def _attention(row: dict[str, object], path: str) -> str:
    """Attention's share of a path's time, with its share of the FLOPs in parentheses."""
    attention = row[f"attention_{path}_work_ms"]
    flops = f"({row[f'attention_flop_share_{path}']:.0%})"
    return f"- {flops}" if attention is None else f"{attention / _work(row, path):.0%} {flops}"


def markdown(rows: list[dict[str, object]]) -> str:
    """Wall-clock latency and throughput first, then the same requests on the work clock against FLOPs."""
    columns = [
        ("backbone", lambda r: r["backbone"]),
        ("N (P+R, k)", lambda r: f"{r['N']} ({r['P']}+{r['R']}, {r['k']})"),
        ("batch", lambda r: r["batch"]),
        ("full ms", lambda r: format_figure(r["full_ms"])),
        ("cached ms", lambda r: format_figure(r["cached_ms"])),
        ("speedup", lambda r: f"{r['speedup']:.1f}x"),
        ("full req/s", lambda r: format_figure(r["full_rps"])),
        ("cached req/s", lambda r: format_figure(r["cached_rps"])),
        ("compress ms", lambda r: format_figure(r["compress_ms"])),
        ("full CPU ms", lambda r: format_figure(r["full_cpu_ms"])),
        ("cached CPU ms", lambda r: format_figure(r["cached_cpu_ms"])),
        ("CPU speedup", lambda r: "-" if r["speedup_cpu"] is None else f"{r['speedup_cpu']:.1f}x"),
        ("FLOP ratio", lambda r: f"{r['flop_ratio']:.1f}x"),
        (
            "roofline full / cached ms",
            lambda r: f"{format_figure(r['roofline_full_ms'])} / {format_figure(r['roofline_cached_ms'])}",
        ),
        (
            "attention % of time (FLOPs), full / cached",
            lambda r: f"{_attention(r, 'full')} / {_attention(r, 'cached')}",
        ),
        ("full ms, causal SDPA", lambda r: format_figure(r["full_causal_work_ms"])),
        ("1-item ms", lambda r: format_figure(_work(r, "one_item"))),
        ("max abs score diff", lambda r: f"{r['max_abs_score_diff']:.1e}"),
        ("cpu share", lambda r: f"{r['cpu_share']:.2f}"),
        ("load 1m", lambda r: f"{r['load_1m_start']:.1f}-{r['load_1m_end']:.1f}"),
    ]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(get(row)) for _, get in columns) + " |" for row in rows]
    return "\n".join(lines)


def analysis(rows: list[dict[str, object]]) -> list[str]:
    """One line per backbone: speedup against the FLOP ratio at the reference row, and where the gap comes from.

    Figures are on the work clock. The "expected" speedup models the cached request as the full path's time
    per FLOP times its FLOPs, plus the cost of a one-item request (work that does not shrink with R).
    """
    lines = []
    for name in dict.fromkeys(row["backbone"] for row in rows):
        own = [row for row in rows if row["backbone"] == name]
        single = [row for row in own if row["batch"] == 1] or own
        ref = min(single, key=lambda row: (abs(row["N"] - 1280), row["batch"]))
        full, cached, one_item = _work(ref, "full"), _work(ref, "cached"), _work(ref, "one_item")
        speedup = full / cached
        expected = full / (full / ref["flop_ratio"] + one_item)
        attention_full, attention_cached = ref["attention_full_work_ms"], ref["attention_cached_work_ms"]
        share_full, share_cached = ref["attention_flop_share_full"], ref["attention_flop_share_cached"]
        clock = "CPU time" if ref["work_clock"] == "cpu" else "wall time"
        speedups = ", ".join(
            f"N={row['N']} b{row['batch']} {_work(row, 'full') / _work(row, 'cached'):.1f}x" for row in own
        )
        text = (
            f"- {name}, N={ref['N']} batch {ref['batch']} ({clock}): the cache is {speedup:.1f}x faster per "
            f"request against a FLOP ratio of {ref['flop_ratio']:.1f}x ({speedup / ref['flop_ratio']:.0%} of it; "
            f"{expected:.1f}x expected from the full path's time per FLOP plus the {format_figure(one_item)} ms a one-item "
            f"request costs). Full path {format_figure(full)} ms = {full / ref['roofline_full_ms']:.1f}x its matmul "
            f"roofline ({format_figure(ref['roofline_full_ms'])} ms at {ref['peak_gflops']:.0f} GFLOP/s); cached path "
            f"{format_figure(cached)} ms = {cached / ref['roofline_cached_ms']:.1f}x its roofline."
        )
        if attention_full is not None and attention_cached is not None:
            text += (
                f" Attention is {share_full:.0%} of the full path's FLOPs and {attention_full / full:.0%} of its "
                f"time ({ref['full_gflop'] * share_full / attention_full * 1e3:.0f} GFLOP/s), {share_cached:.0%} "
                f"of the cached path's FLOPs and {attention_cached / cached:.0%} of its time "
                f"({ref['cached_gflop'] * share_cached / attention_cached * 1e3:.0f} GFLOP/s)."
            )
        if ref.get("full_causal_work_ms") is not None:
            text += (
                f" Through SDPA's causal kernel instead of the explicit mask the full path takes "
                f"{format_figure(ref['full_causal_work_ms'])} ms: {ref['speedup_vs_causal']:.1f}x is the speedup "
                f"against that faster baseline."
            )
        lines.append(f"{text} All rows: {speedups}.")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES), choices=BACKBONES)
    p.add_argument(
        "--lengths", nargs="+", type=int, default=None, help=f"total history N (default {LENGTHS})"
    )
    p.add_argument("--batches", nargs="+", type=int, default=None, help=f"request batch (default {BATCHES})")
    p.add_argument("--tokens", type=int, default=4, help="expert tokens k")
    p.add_argument("--recent-fraction", type=float, default=0.2, help="R = N * fraction")
    p.add_argument("--layers", type=int, default=None, help="default 16 (LLaMAID: 30, SmolLM2-135M)")
    p.add_argument("--dim", type=int, default=None, help="default 64 (LLaMAID: 576)")
    p.add_argument("--heads", type=int, default=None, help="default 8 (LLaMAID: 9)")
    p.add_argument("--kv-heads", type=int, default=None, help="LLaMAID key/value heads (default 3)")
    p.add_argument("--intermediate", type=int, default=None, help="LLaMAID MLP width (default 1536)")
    p.add_argument("--items", type=int, default=10_000, help="catalogue size scored by every request")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads (0 = torch default). One request per core is how a CPU fleet serves, and "
        "it keeps timings stable on a shared machine",
    )
    p.add_argument("--repeats", type=int, default=9, help="most timed runs per path and row")
    p.add_argument(
        "--budget-s", type=float, default=None, help="timing budget per path and row (default 20 s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="N in {320, 1280}, batch 1, 4 s budget (a minute)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as a JSON list of objects")
    args = p.parse_args(argv)
    quick = {"lengths": [320, 1280], "batches": [1], "budget_s": 4.0}
    full = {"lengths": list(LENGTHS), "batches": list(BATCHES), "budget_s": 20.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def backbone_shape(args: argparse.Namespace, backbone: str) -> dict[str, int | None]:
    """layers, dim, heads (and for LLaMAID kv_heads, intermediate): the options given, else the defaults."""
    shape = dict(SMOLLM2_135M_SHAPE if backbone == "LLaMAID" else NATIVE_SHAPE)
    for name in shape:
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    return shape


def describe_shape(backbone: str, shape: dict[str, int | None]) -> str:
    text = f"{shape['layers']} layers, d={shape['dim']}, {shape['heads']} heads"
    if backbone == "LLaMAID":
        text = (
            f"LLaMAID (Llama): {text}, {shape['kv_heads'] or shape['heads']} key/value heads, "
            f"MLP {shape['intermediate'] or 4 * shape['dim']}"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    print(f"device {device} ({threads} threads), torch {torch.__version__}", file=sys.stderr)
    rows: list[dict[str, object]] = []
    for backbone in args.backbones:
        for length in args.lengths:
            for batch in args.batches:
                spec = RowSpec(
                    backbone,
                    length,
                    batch,
                    tokens=args.tokens,
                    recent_fraction=args.recent_fraction,
                    items=args.items,
                    seed=args.seed,
                    **backbone_shape(args, backbone),
                )
                # Re-measured per row: on a shared machine the load, and so the attainable rate, drifts.
                machine = measure_machine(device, threads)
                row = run_row(spec, machine, args.repeats, args.budget_s)
                rows.append(row)
                print(
                    f"{backbone} N={length} batch={batch}: full {row['full_ms']:.1f} ms, cached "
                    f"{row['cached_ms']:.2f} ms, speedup {row['speedup']:.1f}x (CPU time "
                    f"{format_figure(row['speedup_cpu'])}x, FLOP ratio {row['flop_ratio']:.1f}x), peak "
                    f"{row['peak_gflops']:.0f} GFLOP/s, cpu share {row['cpu_share']:.2f}, "
                    f"load {row['load_1m_end']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
                if args.json is not None:
                    # Rewritten after every row so that a long run leaves its finished rows behind.
                    atomic_write_json(args.json, rows, indent=2)
    peaks = [row["peak_gflops"] for row in rows]
    shapes = dict.fromkeys(describe_shape(name, backbone_shape(args, name)) for name in args.backbones)
    print(
        f"{'; '.join(shapes)}, {args.items:,} items, random init, eval + "
        f"inference mode; {device}, {threads or 'default'} threads; fp32 matmul peak measured per row "
        f"({min(peaks):.0f}-{max(peaks):.0f} GFLOP/s{' on the CPU clock' if device.type == 'cpu' else ''}); "
        "scoring: last position against all items in both paths. Wall-clock columns include other processes' "
        "load (see cpu share, load); CPU-time columns, rooflines and the attention shares do not.\n"
    )
    print(markdown(rows))
    print()
    print("\n".join(analysis(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

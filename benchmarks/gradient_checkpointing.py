"""Gradient checkpointing: activation memory kept for the backward pass and step time, against no checkpointing.

For each backbone the same model and batch run a forward + backward with `--gradient_checkpointing` off (the
baseline) and on, interleaved, median of the repeats. "Saved MiB" is the memory of the tensors autograd keeps
for the backward pass (distinct storages, counted by a saved-tensors hook): what checkpointing trades for
recomputation. Gradients of both runs are compared element by element (they must be equal: the same
operations run on the same values).

    python benchmarks/gradient_checkpointing.py
    python benchmarks/gradient_checkpointing.py --layers 4 --length 128 --batch 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from persrec.config import load_config
from persrec.train.build import build_model


def saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves during one forward, and the loss."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss(model, batch)
    return sum(storages.values()), loss


def step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    queries, targets = model(batch)
    keep = targets > 0
    scores = torch.nn.functional.normalize(queries[keep], dim=-1) @ model.item_embeddings().T
    return torch.nn.functional.cross_entropy(scores / 0.05, targets[keep])


def measure(name: str, args: argparse.Namespace) -> dict[str, float | str]:
    overrides = {
        "model": name,
        "MAX_ITEM_LIST_LENGTH": args.length,
        "n_layers": args.layers,
        "n_heads": 2,
        "item_embedding_size": args.dim,
        "hidden_dropout_prob": 0.0,
    }
    torch.manual_seed(0)
    model = build_model(load_config(overrides=overrides), num_items=args.items)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.items + 1, (args.batch, args.length), generator=generator)
    batch = {"input_ids": ids, "target_ids": torch.roll(ids, -1, 1)}
    model.train()
    times: dict[bool, list[float]] = {False: [], True: []}
    saved: dict[bool, int] = {}
    grads: dict[bool, list[torch.Tensor]] = {}
    for repeat in range(args.repeats + 1):
        for checkpointing in (False, True):
            model.backbone.set_gradient_checkpointing(checkpointing)
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            nbytes, loss = saved_bytes(model, batch)
            loss.backward()
            if repeat:  # the first round warms up
                times[checkpointing].append(time.perf_counter() - start)
            saved[checkpointing] = nbytes
            grads[checkpointing] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    difference = max((a - b).abs().max().item() for a, b in zip(grads[False], grads[True], strict=True))
    base, ours = statistics.median(times[False]), statistics.median(times[True])
    return {
        "backbone": name,
        "saved_mib": saved[False] / 2**20,
        "checkpointed_mib": saved[True] / 2**20,
        "memory_ratio": saved[True] / saved[False],
        "step_ms": base * 1e3,
        "checkpointed_ms": ours * 1e3,
        "time_ratio": ours / base,
        "max_abs_grad_diff": difference,
    }


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["SASRec", "HSTU"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--items", type=int, default=3706)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(
        f"{args.layers} layers, d={args.dim}, L={args.length}, batch {args.batch}, {torch.get_num_threads()} "
        "threads; ratios: checkpointed / plain, measured in this run"
    )
    print(
        "| backbone | saved MiB | checkpointed MiB | memory ratio | step ms | checkpointed ms | time ratio | max grad diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = [measure(name, args) for name in args.models]
    for row in rows:
        print(
            f"| {row['backbone']} | {row['saved_mib']:.1f} | {row['checkpointed_mib']:.1f} | "
            f"{row['memory_ratio']:.3f} | {row['step_ms']:.0f} | {row['checkpointed_ms']:.0f} | "
            f"{row['time_ratio']:.2f} | {row['max_abs_grad_diff']:.1e} |"
        )
    return rows


if __name__ == "__main__":
    main()

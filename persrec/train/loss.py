"""Sampled-softmax contrastive loss (InfoNCE) on L2-normalised embeddings.

Each position's hidden state must pick its true next item out of a shared pool of negatives: uniformly
sampled item ids, optionally the other targets of the batch, optionally gathered from every distributed
rank. Scoring with cosine / temperature keeps the logit scale independent of embedding norms, which is what
lets a fixed (or learned) temperature work across models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Bounds of a learned temperature: below 0.01 logits explode (scale > 100, as in CLIP), above 1 the softmax
# is nearly flat and the loss stops separating items.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 1.0
# Per-position negatives are scored from the whole item table while it has at most this many items per
# negative. Measured on ML-1M shapes (25,600 positions, 128 negatives, d=50, one CPU thread), a loss step takes
# 1.7 s from the table (3,416 items) and 11.7 s gathering the negatives' embeddings; the two cross near 190
# items per negative. 32 keeps the N x num_items logits no larger than the N x M x d gathered embeddings for
# d >= 32.
TABLE_SCORING_RATIO = 32


@dataclass
class NCEConfig:
    """Negatives, temperature and collision handling of `SampledSoftmaxLoss`."""

    # Uniformly sampled item ids in [1, num_items] per sequence (see `negatives_per_sequence`).
    num_negatives: int = 128
    # Draw `num_negatives` ids for every sequence of the batch (shared by that sequence's positions) instead of
    # one set for the whole batch (needs `sequence_length` in `forward`). With one shared set only M items per
    # step are pushed away from the queries while every target is pulled towards them: on ML-1M the item
    # embeddings collapse (random negatives reach cosine 0.7 with the queries) and SASRec stays near popularity.
    negatives_per_sequence: bool = True
    # Draw `num_negatives` ids for every position (the generative-recommenders sampler; takes precedence over
    # `negatives_per_sequence`). Most negatives per step and the closest to the full softmax, at a memory cost
    # of min(N * M * D, N * num_items) floats for N positions (padding included, so no host sync is needed to
    # drop it); see `SampledSoftmaxLoss.forward` for when the whole item table is scored instead.
    negatives_per_position: bool = False
    # Also use the batch's (distinct) target items as negatives.
    in_batch_negatives: bool = False
    # all_gather the negatives' embeddings over torch.distributed ranks (no-op unless world size > 1).
    gather_across_ranks: bool = False
    temperature: float = 0.05
    # Learn log(1 / temperature), initialised from `temperature`, with the temperature clamped to
    # [MIN_TEMPERATURE, MAX_TEMPERATURE].
    learnable_temperature: bool = False
    # Mask out sampled negatives whose id equals the position's positive id.
    remove_collisions: bool = True
    # Also mask negatives whose embedding is nearly the positive's (cosine above this), e.g. 0.99 for
    # duplicated items with distinct ids. None disables the check.
    collision_cosine_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")
        if self.num_negatives == 0 and not self.in_batch_negatives:
            raise ValueError("no negatives: set num_negatives > 0 or in_batch_negatives=True")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.learnable_temperature and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"a learnable temperature must start in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                f"got {self.temperature}"
            )
        threshold = self.collision_cosine_threshold
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise ValueError(f"collision_cosine_threshold must lie in [-1, 1], got {threshold}")


@dataclass
class LossOutput:
    """The loss and a few detached statistics for logging (all tensors, so logging never forces a sync)."""

    loss: Tensor  # scalar, mean over positions with a target
    num_positions: Tensor  # scalar int64, positions with a target (> 0)
    logits_pos_mean: Tensor  # scalar, mean positive logit
    logits_neg_mean: Tensor  # scalar, mean logit over unmasked negatives
    temperature: Tensor  # scalar, the temperature in use


def _distributed_world() -> tuple[int, int] | None:
    """(rank, world size) when a multi-process group is running, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def _gather_padded(local: Tensor, sizes: list[int]) -> Tensor:
    """all_gather rows of possibly different counts per rank, by padding to the largest count: [n_r, ...] ->
    [sum(sizes), ...] in rank order. Padding keeps this portable across backends."""
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes, strict=True)])


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward hands every rank the gradient *summed over all ranks* for its own rows.

    A row gathered from rank r is a negative in every rank's loss, so its true gradient is the sum of those
    losses' gradients. The backward therefore all-reduces (sums) the gathered gradient and keeps this rank's
    slice. Each rank thus holds the gradient of the sum of all ranks' losses w.r.t. its parameters, and
    DistributedDataParallel's averaging turns that into the gradient of the mean loss, exactly as with
    one big batch.
    """

    @staticmethod
    def forward(ctx, local: Tensor, sizes: list[int], rank: int) -> Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_padded(local, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def _index_padding_away(device: torch.device) -> bool:
    """Whether padding positions are dropped before scoring per-position negatives. On the CPU finding them
    costs no device sync and saves their share of the scoring (about 45 % of ML-1M's positions); on an
    accelerator the data-dependent shape would stall the host every step, so they are masked instead."""
    return device.type == "cpu"


def _first_occurrence(ids: Tensor) -> Tensor:
    """[C] ids -> [C] bool, True at the first occurrence of each id. Sort-based: O(C log C) memory-light and,
    unlike torch.unique, free of device syncs (duplicates stay as masked columns instead of being dropped)."""
    sorted_ids, order = torch.sort(ids, stable=True)
    repeat = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat[1:] = sorted_ids[1:] == sorted_ids[:-1]
    return ~torch.empty_like(repeat).scatter_(0, order, repeat)


@dataclass
class _PrivateNegatives:
    """Sampled negatives private to each group of positions (a sequence, or a single position)."""

    ids: Tensor  # [rows, M]; every group of N / rows consecutive positions shares one row
    # [rows * M, D] normalised embeddings of `ids`, or with `from_table` the whole table [num_items, D]
    embeddings: Tensor
    from_table: bool

    def scores(self, vectors: Tensor) -> Tensor:
        """[N, D] unit vectors -> [N, M] cosine of each position with its group's negatives."""
        rows, m = self.ids.shape
        if self.from_table:  # item i is table row i - 1
            per_position = (
                self.ids.repeat_interleave(len(vectors) // rows, 0) if rows < len(vectors) else self.ids
            )
            return (vectors @ self.embeddings.T).gather(1, per_position - 1)
        grouped = vectors.view(rows, -1, vectors.shape[-1])  # [rows, N / rows, D] x [rows, D, M]
        return torch.bmm(grouped, self.embeddings.view(rows, m, -1).transpose(1, 2)).view(len(vectors), m)

    def equal_to(self, target_ids: Tensor) -> Tensor:
        """[N] ids -> [N, M] bool, True where a position's negative is its own target (broadcast, no copy of
        the ids per position)."""
        rows, m = self.ids.shape
        return (self.ids[:, None, :] == target_ids.view(rows, -1, 1)).view(len(target_ids), m)


class SampledSoftmaxLoss(nn.Module):
    """InfoNCE over cos(query, item) / temperature with the positive in column 0 and shared negatives.

    Negative columns are the sampled ids (M = num_negatives) and, with `in_batch_negatives`, the batch's
    targets (duplicates masked). A position's own target among the in-batch columns is always masked: it is
    the positive itself, not a negative. Sampled ids equal to the positive are masked with
    `remove_collisions`. A position whose negatives are all masked keeps only its positive and contributes a
    loss of exactly 0. Positions with target 0 (padding) are ignored and are never in-batch negatives. Memory is O(N * (M + N)) for N positions (times world size when gathering).
    """

    def __init__(self, config: NCEConfig, num_items: int) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.config = config
        self.num_items = num_items
        log_inv_temperature = torch.tensor(math.log(1.0 / config.temperature))
        if config.learnable_temperature:
            self.log_inv_temperature = nn.Parameter(log_inv_temperature)
        else:
            self.register_buffer("log_inv_temperature", log_inv_temperature, persistent=False)

    def logit_scale(self) -> Tensor:
        """1 / temperature as a scalar tensor (clamped when learned)."""
        if not self.config.learnable_temperature:
            return self.log_inv_temperature.exp()
        low, high = math.log(1.0 / MAX_TEMPERATURE), math.log(1.0 / MIN_TEMPERATURE)
        return self.log_inv_temperature.clamp(low, high).exp()

    def sample_negative_ids(
        self, device: torch.device, generator: torch.Generator | None = None, rows: int | None = None
    ) -> Tensor:
        """[M] (or [rows, M]) uniform ids in [1, num_items] (0 is padding). Drawn on `generator`'s device when
        it has one, so a CPU generator stays usable (and reproducible) with a CUDA model."""
        size = (self.config.num_negatives,) if rows is None else (rows, self.config.num_negatives)
        if generator is None:
            return torch.randint(1, self.num_items + 1, size, device=device)
        ids = torch.randint(1, self.num_items + 1, size, device=generator.device, generator=generator)
        return ids.to(device, non_blocking=True)

    def forward(
        self,
        query: Tensor,
        target_ids: Tensor,
        item_embedding: Callable[[Tensor], Tensor],
        generator: torch.Generator | None = None,
        sequence_length: int | None = None,
    ) -> LossOutput:
        """query: [N, D] hidden states; target_ids: [N] int64 positive ids; item_embedding: ids [...] -> [..., D].

        A target of 0 (padding) marks a position without a loss: it is masked rather than indexed away, so
        callers can pass the flattened [B * L] outputs of a padded batch without a device sync. The loss is
        the mean over the remaining positions and 0 when there are none.
        """
        cfg = self.config
        n = query.shape[0]
        device = query.device
        target_ids = target_ids.long()
        valid = target_ids > 0  # [N]
        num_valid = valid.sum()
        denominator = num_valid.clamp(min=1)
        # Private negatives per group of positions: a group is one position or one sequence.
        group = 1 if cfg.negatives_per_position else sequence_length
        per_group = (
            cfg.num_negatives > 0
            and group is not None
            and (cfg.negatives_per_position or cfg.negatives_per_sequence)
        )
        rows = n // group if per_group else 1
        if per_group and rows * group != n:
            raise ValueError(f"{n} positions are not whole sequences of length {group}")
        sampled_ids = None
        if cfg.num_negatives:
            sampled_ids = (
                self.sample_negative_ids(device, generator, rows).flatten()
                if per_group
                else self.sample_negative_ids(device, generator)
            )

        if per_group and cfg.negatives_per_position and _index_padding_away(device):
            # Each kept position keeps the negatives drawn for it, so the result is that of the masked path.
            keep = valid.nonzero().squeeze(1)
            query, target_ids, valid = query[keep], target_ids[keep], valid[keep]
            sampled_ids = sampled_ids.view(n, -1)[keep].flatten()
            n = rows = keep.shape[0]

        # Private negatives are scored against the whole item table (a matmul, then a gather of the sampled
        # columns) instead of gathering [rows * M, D] embeddings when the table is at most TABLE_SCORING_RATIO
        # times the negatives per row: per-position negatives on catalogues of up to a few thousand items.
        from_table = per_group and n * self.num_items <= TABLE_SCORING_RATIO * rows * cfg.num_negatives
        if from_table:
            table_ids = torch.arange(1, self.num_items + 1, device=device)
            lookup_ids = torch.cat([target_ids, table_ids])
        else:  # one lookup for positives and sampled negatives
            lookup_ids = target_ids if sampled_ids is None else torch.cat([target_ids, sampled_ids])
        embeddings = F.normalize(item_embedding(lookup_ids).float(), dim=-1)
        positives = embeddings[:n]  # [N, D]
        private = None
        if per_group:
            private = _PrivateNegatives(sampled_ids.view(rows, -1), embeddings[n:], from_table)
            sampled_ids, embeddings = None, embeddings[:n]
            if not cfg.in_batch_negatives:
                sampled_ids = private.ids.new_empty(0)  # no shared columns
                embeddings = torch.cat([embeddings, embeddings.new_empty(0, embeddings.shape[-1])])

        neg_ids, neg_emb, in_batch = self._negatives(target_ids, sampled_ids, embeddings)
        keep = torch.ones_like(neg_ids, dtype=torch.bool)
        if cfg.in_batch_negatives:
            keep &= ~in_batch | _first_occurrence(torch.where(in_batch, neg_ids, -1))

        with torch.autocast(device_type=device.type, enabled=False):
            # Zeroing padding rows first keeps a non-finite hidden state there out of the backward pass.
            queries = F.normalize(torch.where(valid.unsqueeze(1), query.float(), 0.0), dim=-1)
            scale = self.logit_scale().float()
            pos_logits = (queries * positives).sum(dim=-1) * scale  # [N]
            neg_logits = queries @ neg_emb.T * scale  # [N, C]

            same_id = neg_ids.unsqueeze(0) == target_ids.unsqueeze(1)  # [N, C]
            masked = ~keep.unsqueeze(0) | (same_id & (in_batch.unsqueeze(0) | cfg.remove_collisions))
            if cfg.in_batch_negatives:
                masked = masked | (in_batch & (neg_ids == 0)).unsqueeze(0)  # padding positions' targets
            if cfg.collision_cosine_threshold is not None:
                with torch.no_grad():
                    masked = masked | (positives @ neg_emb.T > cfg.collision_cosine_threshold)
            neg_logits = neg_logits.masked_fill(masked, -math.inf)
            if private is not None:
                row_logits = private.scores(queries) * scale  # [N, M]
                row_masked = private.equal_to(target_ids) & cfg.remove_collisions
                if cfg.collision_cosine_threshold is not None:
                    with torch.no_grad():
                        row_masked = row_masked | (private.scores(positives) > cfg.collision_cosine_threshold)
                row_logits = row_logits.masked_fill(row_masked, -math.inf)
                neg_logits = torch.cat([row_logits, neg_logits], dim=1)
                masked = torch.cat([row_masked, masked], dim=1)

            logits = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1)  # [N, 1 + C]
            per_position = torch.logsumexp(logits, dim=1) - pos_logits
            loss = torch.where(valid, per_position, 0.0).sum() / denominator

        with torch.no_grad():
            counted = ~masked & valid.unsqueeze(1)
            neg_sum = torch.where(counted, neg_logits, 0.0).sum()
            stats = LossOutput(
                loss=loss,
                num_positions=num_valid,
                logits_pos_mean=torch.where(valid, pos_logits, 0.0).sum() / denominator,
                logits_neg_mean=neg_sum / counted.sum().clamp(min=1),
                temperature=1.0 / scale.detach(),
            )
        return stats

    def _negatives(
        self, target_ids: Tensor, sampled_ids: Tensor | None, embeddings: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Ids [C], normalised embeddings [C, D] and in-batch flags [C] of all negative columns, gathered over
        ranks when configured. Column order per rank: sampled ids, then in-batch targets."""
        cfg = self.config
        n = target_ids.shape[0]
        id_parts, emb_parts = [], []
        if sampled_ids is not None:
            id_parts.append(sampled_ids)
            emb_parts.append(embeddings[n:])
        num_sampled = 0 if sampled_ids is None else sampled_ids.shape[0]
        if cfg.in_batch_negatives:
            id_parts.append(target_ids)
            emb_parts.append(embeddings[:n])
        local_ids, local_emb = torch.cat(id_parts), torch.cat(emb_parts)
        local_flags = torch.arange(local_ids.shape[0], device=local_ids.device) >= num_sampled

        world = _distributed_world() if cfg.gather_across_ranks else None
        if world is None:
            return local_ids, local_emb, local_flags
        rank, world_size = world
        sizes = [local_ids.shape[0]] * world_size
        if cfg.in_batch_negatives:
            # Ranks may train different numbers of positions, so the column counts are exchanged first (a small
            # collective whose result the host needs; sampled negatives alone have equal counts everywhere).
            count = torch.tensor([local_ids.shape[0]], device=local_ids.device)
            counts = [torch.empty_like(count) for _ in range(world_size)]
            dist.all_gather(counts, count)
            sizes = torch.cat(counts).tolist()
        # One gather for ids and flags together, one (differentiable) gather for the embeddings.
        meta = _gather_padded(torch.stack([local_ids, local_flags.long()], dim=1), sizes)
        gathered_emb = _GatherWithGradient.apply(local_emb, sizes, rank)
        return meta[:, 0], gathered_emb, meta[:, 1].bool()

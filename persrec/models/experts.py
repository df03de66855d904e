"""Personalized experts (PerSRec): learnable tokens that summarise history segments, for any backbone.

An item window of W = P + R items is cut into segments at insertion offsets; after each historical segment j,
k_j expert tokens are inserted. With every slot of the inserted sequence labelled by its segment, the mask is:

    query q may see key j  <=>  j <= q  and  (j is an expert  or  segment(j) == segment(q))

so an item sees its own segment's earlier items and every earlier expert, and an expert sees its own segment's
items and every earlier expert: earlier raw items are only reachable through experts. Position ids run
contiguously over the inserted sequence (0 ... W + k - 1).

Because nothing after an expert can change it, serving can stop at the experts: `compress` runs the history
once and keeps only the experts' per-layer key/values (the expert cache); `refresh` folds a newly completed
segment into the cache without the old items; `predict` runs just the recent window against the cache. The
three share one routine (`_run_slots`) with the full forward pass, so they compute the same numbers.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from persrec.models.base import KVCache, SequenceBackbone


@dataclass(frozen=True)
class ExpertLayout:
    """Where expert tokens sit in a window of `window` items: `insertions` = ((offset, count), ...).

    Offsets count item positions in the window (an insertion at offset o comes after item o - 1); they are
    strictly increasing and inside (0, window), so the last segment (the recent window) is never empty.
    """

    window: int
    insertions: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        offsets = [offset for offset, _ in self.insertions]
        if not self.insertions:
            raise ValueError("an expert layout needs at least one insertion point")
        if any(count < 1 for _, count in self.insertions):
            raise ValueError(f"every insertion needs at least one token, got {list(self.insertions)}")
        if offsets != sorted(set(offsets)):
            raise ValueError(f"insertion offsets must be strictly increasing, got {offsets}")
        if offsets[0] < 1 or offsets[-1] >= self.window:
            raise ValueError(
                f"insertion offsets {offsets} must lie in [1, {self.window - 1}] for a window of {self.window} items "
                "(the recent window after the last insertion must hold at least one item)"
            )

    @classmethod
    def from_options(
        cls,
        *,
        window: int,
        number_of_user_tokens: int,
        insert_method: str | int | list | None,
        pretrain_item_num: int | None,
        recent_item_num: int | None,
    ) -> ExpertLayout:
        """The original scripts' options: `insert_method` 0/None puts all k tokens after `pretrain_item_num`
        items; otherwise a JSON list of [offset, k_j] with Σ k_j = k."""
        k = number_of_user_tokens
        if (
            pretrain_item_num is not None
            and recent_item_num is not None
            and pretrain_item_num + recent_item_num != window
        ):
            raise ValueError(
                f"pretrain_item_num ({pretrain_item_num}) + recent_item_num ({recent_item_num}) = "
                f"{pretrain_item_num + recent_item_num}, but MAX_ITEM_LIST_LENGTH is {window}; they must be equal"
            )
        if isinstance(insert_method, str):
            insert_method = (
                json.loads(insert_method) if insert_method.strip() not in ("", "0", "none", "None") else 0
            )
        if not insert_method:
            history = (
                pretrain_item_num
                if pretrain_item_num is not None
                else (window - recent_item_num if recent_item_num is not None else None)
            )
            if history is None:
                raise ValueError(
                    "insert_method=0 needs pretrain_item_num (or recent_item_num) to place the tokens"
                )
            return cls(window, ((history, k),))
        pairs = tuple((int(offset), int(count)) for offset, count in insert_method)
        total = sum(count for _, count in pairs)
        if total != k:
            counts = " + ".join(str(count) for _, count in pairs)
            raise ValueError(
                f"insert_method token counts {counts} = {total}, but number_of_user_tokens is {k}"
            )
        layout = cls(window, pairs)
        if pretrain_item_num is not None and pairs[-1][0] != pretrain_item_num:
            raise ValueError(
                f"the last insertion offset ({pairs[-1][0]}) must equal pretrain_item_num ({pretrain_item_num}): "
                "the recent window starts after the last expert group"
            )
        return layout

    @property
    def num_tokens(self) -> int:
        return sum(count for _, count in self.insertions)

    @property
    def length(self) -> int:
        """Slots in the inserted sequence."""
        return self.window + self.num_tokens

    @property
    def history_length(self) -> int:
        """Items before the last expert group (P)."""
        return self.insertions[-1][0]

    @cached_property
    def slot_tables(self) -> dict[str, Tensor]:
        """CPU index tables: item_slots [W], expert_slots [k], segment [T], is_expert [T], static mask [T, T]."""
        is_expert, segment = [], []
        previous = 0
        for index, (offset, count) in enumerate(self.insertions):
            is_expert += [False] * (offset - previous) + [True] * count
            segment += [index] * (offset - previous + count)
            previous = offset
        is_expert += [False] * (self.window - previous)
        segment += [len(self.insertions)] * (self.window - previous)
        expert = torch.tensor(is_expert)
        seg = torch.tensor(segment)
        slots = torch.arange(self.length)
        mask = (slots[None, :] <= slots[:, None]) & (expert[None, :] | (seg[None, :] == seg[:, None]))
        return {
            "item_slots": slots[~expert],
            "expert_slots": slots[expert],
            "segment": seg,
            "is_expert": expert,
            "mask": mask,
        }

    def segment_bounds(self, segment: int) -> tuple[int, int]:
        """Slot range [start, stop) of segment `segment` including its expert group (none for the last)."""
        seg = self.slot_tables["segment"]
        slots = torch.nonzero(seg == segment).flatten()
        return int(slots[0]), int(slots[-1]) + 1


class ExpertTokens(nn.Module):
    """The learnable expert vectors: one table [k, D] shared by all users (the paper's default), optionally
    plus a per-user table (only for users seen in training; unseen users fall back to the shared one)."""

    def __init__(self, num_tokens: int, dim: int, num_users: int = 0) -> None:
        super().__init__()
        self.shared = nn.Parameter(torch.randn(num_tokens, dim) * dim**-0.5)
        self.per_user = nn.Embedding(num_users, num_tokens * dim) if num_users else None
        if self.per_user is not None:
            nn.init.zeros_(self.per_user.weight)

    def forward(self, batch: int, users: Tensor | None = None) -> Tensor:
        """[B, k, D] expert input vectors."""
        tokens = self.shared.expand(batch, -1, -1)
        if self.per_user is not None and users is not None:
            known = (users >= 0) & (users < self.per_user.num_embeddings)
            personal = self.per_user(users.clamp(0, self.per_user.num_embeddings - 1)).view_as(tokens)
            tokens = tokens + personal * known[:, None, None].to(personal.dtype)
        return tokens


class ExpertSequenceModel(nn.Module):
    """A backbone with expert tokens: full masked forward for training, cache-based serving for inference."""

    def __init__(self, backbone: SequenceBackbone, layout: ExpertLayout, num_users: int = 0) -> None:
        super().__init__()
        if backbone.config.max_positions < layout.length:
            raise ValueError(
                f"the backbone has {backbone.config.max_positions} positions but the window with experts needs "
                f"{layout.length} ({layout.window} items + {layout.num_tokens} expert tokens)"
            )
        self.backbone = backbone
        self.layout = layout
        self.experts = ExpertTokens(layout.num_tokens, backbone.dim, num_users)
        for name, table in layout.slot_tables.items():
            self.register_buffer(f"_{name}", table, persistent=False)
        # Host-side copies for span arithmetic: reading device buffers per request would synchronise.
        self._item_slot_list: list[int] = layout.slot_tables["item_slots"].tolist()
        self._expert_slot_list: list[int] = layout.slot_tables["expert_slots"].tolist()
        # Window position of the item whose timestamp each expert token carries (its segment's last item).
        self._expert_source = [offset - 1 for offset, count in layout.insertions for _ in range(count)]

    # ---- shared pieces -------------------------------------------------------------------------------------
    def _span_counts(self, start: int, stop: int) -> tuple[int, int, int, int]:
        """Item index range [i0, i1) and expert index range [e0, e1) of the slots in [start, stop)."""
        items, experts = self._item_slot_list, self._expert_slot_list
        return (
            bisect_left(items, start),
            bisect_left(items, stop),
            bisect_left(experts, start),
            bisect_left(experts, stop),
        )

    def _span_inputs(
        self, item_ids: Tensor, timestamps: Tensor | None, users: Tensor | None, start: int, stop: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Inputs [B, S, D], validity [B, S] and timestamps [B, S] of slots [start, stop) of the inserted sequence.

        item_ids / timestamps: [B, n], exactly the items whose slots fall in the span, in order. Only the span
        is built: a request runs a few hundred recent slots of a window of thousands, and embedding the whole
        window to slice it would cost about as much as running the slots.
        """
        i0, i1, e0, e1 = self._span_counts(start, stop)
        if item_ids.shape[1] != i1 - i0:
            raise ValueError(f"slots [{start}, {stop}) hold {i1 - i0} items, got {item_ids.shape[1]}")
        item_inputs = self.backbone.input_embeddings(item_ids)
        if e0 == e1:
            # Items only (the recent window): no scatter, the items are the span.
            return item_inputs, item_ids > 0, timestamps
        batch, length = item_ids.shape[0], stop - start
        item_rel = self._item_slots[i0:i1] - start
        expert_rel = self._expert_slots[e0:e1] - start
        inputs = item_inputs.new_empty(batch, length, self.backbone.dim)
        inputs[:, item_rel] = item_inputs
        inputs[:, expert_rel] = self.experts(batch, users)[:, e0:e1].to(item_inputs.dtype)
        valid = torch.ones(batch, length, dtype=torch.bool, device=item_ids.device)
        valid[:, item_rel] = item_ids > 0
        times = None
        if timestamps is not None:
            sources = [self._expert_source[e] - i0 for e in range(e0, e1)]
            if sources[0] < 0:
                raise ValueError(f"slots [{start}, {stop}) hold experts of a segment that starts before them")
            times = timestamps.new_zeros(batch, length)
            times[:, item_rel] = timestamps
            # An expert group carries the time of the last item of the segment it summarises.
            times[:, expert_rel] = timestamps[:, sources]
        return inputs, valid, times

    def _run_slots(
        self,
        inputs: Tensor,
        valid: Tensor,
        times: Tensor | None,
        start: int,
        stop: int,
        cache: KVCache | None,
        return_cache: bool,
        output_rows: int | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """Run slots [start, stop) of the inserted sequence; `cache` holds every expert slot before `start`.

        inputs / valid / times are for those slots only: [B, stop - start, ...]; `output_rows` n: only the
        hidden states of the last n slots are wanted.
        """
        mask = self._mask[start:stop, start:stop][None] & valid[:, None, :]
        mask = mask | torch.eye(stop - start, dtype=torch.bool, device=mask.device)
        positions = torch.arange(start, stop, device=inputs.device).expand(inputs.shape[0], -1)
        return self.backbone.encode(
            inputs, mask, positions, times, cache=cache, return_cache=return_cache, output_rows=output_rows
        )

    # ---- training / full forward ---------------------------------------------------------------------------
    def item_hidden_states(
        self, item_ids: Tensor, timestamps: Tensor | None = None, users: Tensor | None = None
    ) -> Tensor:
        """The full masked forward: hidden states at the item slots, [B, W] -> [B, W, D]."""
        inputs, valid, times = self._span_inputs(item_ids, timestamps, users, 0, self.layout.length)
        hidden, _ = self._run_slots(inputs, valid, times, 0, self.layout.length, None, False)
        return hidden[:, self._item_slots]

    # ---- serving -------------------------------------------------------------------------------------------
    def _segment_count(self) -> int:
        return len(self.layout.insertions)

    def compress(
        self,
        history_ids: Tensor,
        timestamps: Tensor | None = None,
        users: Tensor | None = None,
        segments: int | None = None,
    ) -> KVCache:
        """Expert cache of the first `segments` historical segments (default: all of them).

        history_ids: [B, P'] items of those segments (left-padded), P' = the offset closing the last one.
        """
        segments = self._segment_count() if segments is None else segments
        end_items = self.layout.insertions[segments - 1][0]
        if history_ids.shape[1] != end_items:
            raise ValueError(
                f"compress over {segments} segment(s) expects {end_items} items, got {history_ids.shape[1]}"
            )
        return self._extend(None, history_ids, timestamps, users, 0, segments)

    def refresh(
        self,
        cache: KVCache,
        segment_ids: Tensor,
        timestamps: Tensor | None = None,
        users: Tensor | None = None,
    ) -> KVCache:
        """Fold the next completed segment into `cache` without re-reading older items.

        segment_ids: [B, n] the items of historical segment number len(cache groups) (n = its length).
        """
        done = self._groups_in(cache)
        if done >= self._segment_count():
            raise ValueError("the cache already holds every historical segment; nothing to refresh")
        start_item = self.layout.insertions[done - 1][0] if done else 0
        expected = self.layout.insertions[done][0] - start_item
        if segment_ids.shape[1] != expected:
            raise ValueError(f"segment {done} holds {expected} items, got {segment_ids.shape[1]}")
        return self._extend(cache, segment_ids, timestamps, users, done, done + 1)

    def _groups_in(self, cache: KVCache) -> int:
        counts = [c for _, c in self.layout.insertions]
        total, groups = 0, 0
        while groups < len(counts) and total < cache.length:
            total += counts[groups]
            groups += 1
        if total != cache.length:
            raise ValueError(f"a cache of {cache.length} slots does not match the expert groups {counts}")
        return groups

    def _extend(
        self,
        cache: KVCache | None,
        item_ids: Tensor,
        timestamps: Tensor | None,
        users: Tensor | None,
        first: int,
        last: int,
    ) -> KVCache:
        """Run segments [first, last) (items + their experts) after `cache` and return the grown cache."""
        start = self.layout.segment_bounds(first)[0]
        stop = self.layout.segment_bounds(last - 1)[1]
        inputs, valid, times = self._span_inputs(item_ids, timestamps, users, start, stop)
        _, new = self._run_slots(inputs, valid, times, start, stop, cache, True)
        _, _, e0, e1 = self._span_counts(start, stop)
        new = new.select(self._expert_slots[e0:e1] - start)
        return new if cache is None else KVCache.concat([cache, new])

    def predict_hidden(
        self,
        cache: KVCache,
        recent_ids: Tensor,
        timestamps: Tensor | None = None,
        output_rows: int | None = None,
    ) -> Tensor:
        """Hidden states of the recent window run against the expert cache: [B, R'] -> [B, R', D] (the last
        `output_rows` slots only, when given: the serving and evaluation reads need one).

        recent_ids are the last R' <= R items of the window (left-padded with 0 where a user has fewer); a
        shorter window runs only its own slots, which gives the states a padded full-length window would.
        """
        if self._groups_in(cache) != self._segment_count():
            raise ValueError("predict needs a cache of every historical segment; compress or refresh first")
        recent = recent_ids.shape[1]
        limit = self.layout.window - self.layout.history_length
        if not 0 < recent <= limit:
            raise ValueError(f"the recent window holds 1 to {limit} items, got {recent}")
        start = self.layout.length - recent
        inputs, valid, times = self._span_inputs(recent_ids, timestamps, None, start, self.layout.length)
        hidden, _ = self._run_slots(
            inputs, valid, times, start, self.layout.length, cache, False, output_rows
        )
        return hidden

"""From a prepared dataset to model inputs: leave-one-out splits and left-padded item windows.

Splits (per user, time-ordered history h): test target = h[-1], validation target = h[-2], training targets =
every item of h[:-2] after the first. Users with fewer than 3 interactions have no validation/test example.

An example ending at target index t "loads" the last `feature_max_length` items up to and including the target
(default: the item window + 1) into that many slots, then keeps slots [start_position, end_position] of them
(inclusive; 0 or None = to the last slot; the original scripts' `item_start_position` / `item_end_position`).
Slots are counted in the full-length load: a history shorter than it fills the last slots and the first ones are
padding (`WindowConfig.select`). The last kept item is the target; the items before it, at most `max_length`, are
the input. Windows are LEFT-padded with item 0, so the most recent item always sits at the last index and position
ids are simply 0 … L-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from persrec.data.store import PreparedDataset

MIN_HISTORY = 3


@dataclass(frozen=True)
class WindowConfig:
    max_length: int = 200
    feature_max_length: int | None = None
    start_position: int = 0
    end_position: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"MAX_ITEM_LIST_LENGTH must be at least 1, got {self.max_length}")
        loaded = self.loaded_length
        if not 0 <= self.start_position < loaded:
            raise ValueError(
                f"item_start_position={self.start_position} must lie in [0, {loaded}) "
                f"(train_feat_max_length={loaded})"
            )
        if self.end_position and not self.start_position < self.end_position < loaded:
            raise ValueError(
                f"item_end_position={self.end_position} must lie in ({self.start_position}, {loaded}) "
                f"(after item_start_position, inside train_feat_max_length={loaded})"
            )

    @property
    def loaded_length(self) -> int:
        return self.feature_max_length or self.max_length + 1

    @property
    def last_slot(self) -> int:
        """The kept slot that holds the target (end_position, or the last slot of the load)."""
        return self.end_position or self.loaded_length - 1

    def select(self, history: np.ndarray, end: int) -> np.ndarray:
        """The real items of the kept slots, oldest first, for a load that ends at history[end - 1].

        The load is `loaded_length` slots; slot s holds history[end - loaded_length + s], or padding where that
        index is negative (a short history is the most recent part of a full-length load, so it fills the last
        slots). Slots start_position..last_slot are kept and their padding is left out: 0 to
        last_slot - start_position + 1 items. The last one is the target only if `target_slot_filled(end)`;
        callers left-pad the result again, so the padding's place is restored.
        """
        first = end - self.loaded_length  # history index of slot 0 (negative for a short history)
        start = max(0, first + self.start_position)
        return history[start : max(start, first + self.last_slot + 1)]

    def target_slot_filled(self, end: np.ndarray) -> np.ndarray:
        """Whether the target slot of a load ending at history[end - 1] holds an item rather than padding
        (elementwise over an array of ends)."""
        return np.asarray(end) - self.loaded_length + self.last_slot >= 0


def _left_pad(values: np.ndarray, length: int, dtype: np.dtype) -> np.ndarray:
    out = np.zeros(length, dtype=dtype)
    if len(values):
        values = values[-length:]
        out[length - len(values) :] = values
    return out


class TrainSequences(Dataset):
    """One example per user: the window of training items, each position predicting the next item."""

    def __init__(
        self,
        store: PreparedDataset,
        window: WindowConfig,
        users: np.ndarray | None = None,
        held_out: int = 2,
    ) -> None:
        """`held_out` last items of every user are never trained on: 2 (validation and test items), or 1 when
        there is no validation split and the second-to-last item is a training target."""
        if held_out not in (1, 2):
            raise ValueError(f"held_out must be 1 or 2, got {held_out}")
        self.store = store
        self.window = window
        self.held_out = held_out
        lengths = store.lengths()
        eligible = np.flatnonzero(lengths >= MIN_HISTORY)
        self.users = eligible if users is None else np.intersect1d(users, eligible)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        user = int(self.users[index])
        start, stop = int(self.store.offsets[user]), int(self.store.offsets[user + 1])
        end = stop - start - self.held_out
        items = self.window.select(self.store.items[start:stop], end)
        times = self.window.select(self.store.timestamps[start:stop], end)
        length = self.window.max_length
        return {
            "input_ids": torch.from_numpy(_left_pad(items[:-1], length, np.int64)),
            "target_ids": torch.from_numpy(_left_pad(items[1:], length, np.int64)),
            "timestamps": torch.from_numpy(_left_pad(times[:-1], length, np.int64)),
            "user": torch.tensor(user),
        }


class EvalSequences(Dataset):
    """One example per user: the window before the held-out item of `split`, plus the items already seen."""

    def __init__(
        self,
        store: PreparedDataset,
        split: Literal["valid", "test"],
        window: WindowConfig,
        users: np.ndarray | None = None,
        with_seen: bool = False,
        stale_gap: tuple[int, int] | None = None,
    ) -> None:
        """`stale_gap=(recent, gap)` drops the `gap` items just before the last `recent` input items, so the
        part of the window before them (an expert model's history) is `gap` interactions out of date."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        self.store = store
        self.window = window
        self.held_out = 2 if split == "valid" else 1
        self.with_seen = with_seen
        self.stale_gap = stale_gap
        lengths = store.lengths()
        eligible = np.flatnonzero(lengths >= MIN_HISTORY)
        if stale_gap is None:
            # A user whose target slot is padding (history too short for item_end_position) has no example.
            ends = lengths[eligible] - self.held_out + 1
            eligible = eligible[window.target_slot_filled(ends)]
        self.users = eligible if users is None else np.intersect1d(users, eligible)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        user = int(self.users[index])
        start, stop = int(self.store.offsets[user]), int(self.store.offsets[user + 1])
        end = stop - start - self.held_out + 1
        history = self.store.items[start:stop]
        items = self._select(history, end)
        times = self._select(self.store.timestamps[start:stop], end)
        length = self.window.max_length
        example = {
            "input_ids": torch.from_numpy(_left_pad(items[:-1], length, np.int64)),
            "timestamps": torch.from_numpy(_left_pad(times[:-1], length, np.int64)),
            "target": torch.tensor(int(items[-1])),
            "user": torch.tensor(user),
        }
        if self.with_seen:
            example["seen"] = torch.from_numpy(np.asarray(history[: end - 1], dtype=np.int64))
        return example

    def _select(self, values: np.ndarray, end: int) -> np.ndarray:
        """The example's items (inputs + target); with a stale gap: [older history][gap removed][recent][target]
        (the window's item_start/end_position slicing does not apply then)."""
        if self.stale_gap is None:
            return self.window.select(values, end)
        recent, gap = self.stale_gap
        tail = values[max(0, end - recent - 1) : end]
        older = values[: max(0, end - recent - 1 - gap)][-(self.window.max_length - recent) :]
        return np.concatenate([older, tail])


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack fixed-size fields; right-pad the variable-length `seen` lists with 0 (never a real item)."""
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0] if key != "seen"}
    if "seen" in examples[0]:
        batch["seen"] = torch.nn.utils.rnn.pad_sequence([e["seen"] for e in examples], batch_first=True)
    return batch

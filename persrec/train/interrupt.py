"""Ctrl-C and SIGTERM end a training run at the next step with a checkpoint, not with a traceback."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist


class TrainingInterrupted(Exception):
    """Raised by the trainer after it saved a checkpoint in answer to a signal."""

    def __init__(self, signum: int, checkpoint: str, resume_command: str) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.resume_command = resume_command

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopRequests:
    """Remembers the first SIGINT/SIGTERM while installed; a second one of either ends the process at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not under a test runner's thread)
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def agreed(self, distributed: bool, device: torch.device) -> int | None:
        """The signal every rank should stop for: ranks must stop at the same step to save one checkpoint."""
        if not distributed:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

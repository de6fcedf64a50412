"""Stop a training run cleanly on SIGINT or SIGTERM: finish the step in flight, checkpoint, exit.

A signal only sets a flag and the loop reads it between steps, so the checkpoint is a state an uninterrupted run also
passes through and exact resume holds. Under torch.distributed the ranks agree (the max of their flags) at the loop's
logging steps, where it synchronises anyway, so every rank stops after the same step and the collective checkpoint
lines up. A third signal gives up on the checkpoint and raises at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after the checkpoint of an interrupted run was written; its message says how to continue."""


class StopRequest:
    """Context manager: installs the handlers (main thread only; elsewhere it never fires) and restores them on exit."""

    def __init__(self, distributed: bool = False, device: Any = "cpu") -> None:
        self.distributed, self.device = distributed, device
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt
        if self.count == 1:
            name = signal.Signals(signum).name
            print(f"\n{name}: stopping after this step with a checkpoint (twice more to stop without)", file=sys.stderr)

    def requested(self, sync: bool = True) -> bool:
        """Whether to stop now. ``sync``: also ask the other ranks (a collective: call it at the same step on all)."""
        if not self.distributed:
            return self.count > 0
        if not sync:
            return False
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.count > 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

"""Stop a training run cleanly on SIGINT or SIGTERM: finish the step in flight, checkpoint, exit.

A signal only sets a flag and the loop reads it between steps, so the checkpoint is a state an uninterrupted run also
passes through and exact resume holds. Under torch.distributed the ranks agree (the max of their flags, one scalar
all-reduce) after every step, so every rank stops after the same step and the collective checkpoint lines up within one
step of the signal (torchrun kills its workers if they take longer than its shutdown timeout). A third signal gives up
on the checkpoint and raises at once.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after the checkpoint of an interrupted run was written; its message says how to continue."""


class StopRequest:
    """Context manager: installs the handlers (main thread only; elsewhere it never fires) and restores them on exit.
    A signal the process was started ignoring (``nohup``, ``cmd &`` from a script) stays ignored."""

    def __init__(self, distributed: bool = False, device: Any = "cpu") -> None:
        self.distributed, self.device = distributed, device
        self.count = 0
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequest:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                previous = signal.getsignal(s)
                if previous is signal.SIG_IGN:
                    continue
                signal.signal(s, self._handle)
                # None: a handler installed outside Python, which cannot be put back; the default is the closest
                self._previous[s] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker: the main process decides and stops it
            return
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt
        if self.count == 1:
            name = signal.Signals(signum).name
            # os.write, not print: a signal that lands inside a blocked write to stderr would make print re-enter
            msg = f"\n{name}: stopping after this step with a checkpoint (twice more to stop without)\n"
            os.write(2, msg.encode())

    def requested(self) -> bool:
        """Whether to stop now. Distributed, a collective: every rank calls it after the same step."""
        if not self.distributed:
            return self.count > 0
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.count > 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

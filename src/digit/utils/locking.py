"""An exclusive lock on a run directory, so two processes never train into the same one.

``fcntl.flock`` on ``DIR/.lock``: the kernel drops the lock when the holding process exits for any reason (SIGKILL,
OOM kill, a crash), so a lock left by a killed run never blocks its ``--resume``. The file itself stays (unlinking it
would let two processes lock two different inodes); it holds the pid of the last holder, for the refusal message.
On systems without ``fcntl`` (Windows) no lock is taken.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from digit.errors import DigitError

LOCK_FILE = ".lock"


def _alive(pid: str) -> bool:
    """Whether the process recorded in the lock file still runs (unknown counts as alive)."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


class DirectoryLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process's end)."""

    def __init__(self, directory: Path, fd: int | None) -> None:
        self.directory, self._fd = directory, fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike, what: str = "run directory", grace_s: float = 15.0) -> DirectoryLock:
        """Lock ``directory`` (created if needed) or raise DigitError naming the process that holds it."""
        directory = Path(directory)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return cls(directory, None)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + grace_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                # Forked children (DataLoader workers) share the lock and outlive a killed holder by a few seconds
                # (they poll for their parent's death): wait for them rather than refuse a resume.
                if not _alive(holder) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                os.close(fd)
                raise DigitError(
                    f"{directory}: another process (pid {holder or 'unknown'}) is using this {what}; wait for it to "
                    "finish or stop it, then run again (a killed process leaves no lock behind)"
                ) from None
            except OSError:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(directory, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_on_main_rank(directory: str | os.PathLike, is_main: bool, distributed: bool) -> DirectoryLock | None:
    """Under torchrun only rank 0 holds the lock; every rank raises the same DigitError when it is taken."""
    lock, error = None, None
    if is_main:
        try:
            lock = DirectoryLock.acquire(directory)
        except DigitError as e:
            error = str(e)
    if distributed:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise DigitError(error)
    return lock

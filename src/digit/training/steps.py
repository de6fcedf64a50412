"""A run's length and data order: pure functions of its config, so a resumed run sees exactly the batches an
uninterrupted one would."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from digit.errors import DigitError


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``n_samples`` with a global batch of ``batch_size`` (drop-last)."""
    n = n_samples // batch_size
    if n == 0:
        raise DigitError(f"dataset has {n_samples} samples, fewer than one global batch of {batch_size}")
    return n


def total_steps(n_samples: int, batch_size: int, *, steps: int | None = None, epochs: float | None = None) -> int:
    """The run length in optimizer steps: ``steps`` when given, else ``ceil(epochs * steps_per_epoch)`` (at least 1).

    The one place a step count is derived from epochs: the trainer uses it, and so does a task that needs the count
    before its trainer exists (DINO's schedules)."""
    if steps is None and epochs is None:
        raise DigitError("give --steps or --epochs")
    per_epoch = steps_per_epoch(n_samples, batch_size)
    if steps is not None:
        if steps <= 0:
            raise DigitError(f"--steps must be > 0, got {steps}")
        return int(steps)
    if not epochs > 0 or not math.isfinite(epochs):
        raise DigitError(f"--epochs must be a finite number > 0, got {epochs}")
    return max(1, math.ceil(epochs * per_epoch))


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (a hash, so nearby tuples give unrelated streams)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)

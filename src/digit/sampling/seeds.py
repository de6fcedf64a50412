"""Per-image random streams: image ``i`` of a run with seed ``s`` draws from its own generator, seeded from (s, i).

An image's tokens then depend on its seed, index, condition and settings only, not on the batch it is sampled in, the
batch size or the rank that samples it (the union of a torchrun run's shards is the single-process run).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of a run seeded ``seed`` (numpy's SeedSequence mixing; any int seed)."""
    words = np.random.SeedSequence([int(seed) % 2**64, int(index)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


def image_generators(seed: int, indices: Iterable[int], device: Any = "cpu") -> list[torch.Generator]:
    """One generator per image index, on ``device``."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, int(i))) for i in indices]


def batch_ranges(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
    """The ``[start, end)`` batches of ``n`` items this rank samples: batch ``b`` goes to rank ``b % world_size``, so
    every batch has the same rows and shape as in a single-process run (bitwise the same arithmetic)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    return [(s, min(s + batch_size, n)) for b, s in enumerate(starts) if b % world_size == rank]

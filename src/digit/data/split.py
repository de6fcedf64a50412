"""Split a labelled image collection into train / validation folders (a seeded permutation, the same on every machine).

The recipes need one fixed held-out split shared by every step (encoder kNN monitor, FID reference, linear probes, token
stability), so the split is written to disk once as two ImageFolder trees rather than re-derived by each command.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from digit.data.sources import open_image_source
from digit.errors import DigitError
from digit.utils.io import atomic_write_json, read_json


def split_roles(n: int, val_count: int, seed: int = 0, used: int | None = None) -> np.ndarray:
    """The seeded split as an array over the source's entries: 0 unused, 1 train, 2 val (what split_folders writes)."""
    perm = np.random.default_rng(seed).permutation(n)
    role = np.zeros(n, dtype=np.int8)
    role[perm[: n if used is None else used]] = 1
    role[perm[:val_count]] = 2
    return role


def split_folders(
    data: str | os.PathLike, out: str | os.PathLike, val_count: int, seed: int = 0, limit: int | None = None
) -> dict:
    """Write ``out/train/<class>/`` and ``out/val/<class>/`` with ``val_count`` images held out (and, with ``limit``,
    only that many images in all); returns the summary also written to ``out/split.json``. An existing complete split
    with the same parameters is reused."""
    out = Path(out)
    marker = out / "split.json"
    src = open_image_source(data)
    if not src.labeled:
        raise DigitError(f"{data} has no class folders: a train/val split needs labels")
    used = len(src) if limit is None else min(limit, len(src))
    if not 0 < val_count < used:
        raise DigitError(f"validation count {val_count} must be between 1 and {used - 1}")
    summary = {
        "source": str(data),
        "files": len(src),
        "used": used,
        "val": val_count,
        "train": used - val_count,
        "seed": seed,
        "classes": src.class_names,
    }
    if marker.is_file() and read_json(marker) == summary:
        return summary
    role = split_roles(len(src), val_count, seed=seed, used=used)
    for split in ("train", "val"):
        for name in src.class_names:
            (out / split / name).mkdir(parents=True, exist_ok=True)
    for i, blob in src.iter_bytes(lambda i: role[i] > 0):
        if isinstance(blob, OSError):
            raise DigitError(f"cannot read {src.entries[i].key}: {blob}")
        entry = src.entries[i]
        dest = out / ("val" if role[i] == 2 else "train") / src.class_names[entry.label] / Path(entry.key).name
        dest.write_bytes(blob)
    atomic_write_json(marker, summary)
    return summary

"""The token directory: the one on-disk format for token grids, written by `digit tokenize` and `digit sample`.

    tokens.npy   [N, h, w]  uint16 when vocab_size <= 65536, else int32 (np.load(mmap_mode="r") friendly)
    labels.npy   [N]        int64, -1 when unlabeled
    meta.json    grid, vocab_size, num_classes, class_names, views, n_images, tokenizer config, source, skipped counts, ...

With several views (e.g. `--flip`), rows are stacked view-major: row ``v * n_images + i`` is view ``views[v]`` of image
``i``; labels are repeated per view. Every row is a training sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from digit.errors import DigitError
from digit.utils.io import atomic_save_numpy, atomic_write_json, read_json
from digit.utils.outputs import OutputDir, as_output

FORMAT = "digit.tokens"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


@dataclass
class TokenDirectory:
    """An opened token directory. ``tokens`` is a read-only memmap unless loaded with ``mmap=False``."""

    path: Path
    tokens: np.ndarray  # [N, h, w]
    labels: np.ndarray  # [N] int64
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.meta["grid"]
        return int(h), int(w)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 0))

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names", []))

    @property
    def n_images(self) -> int:
        return int(self.meta.get("n_images", len(self.tokens)))

    @property
    def views(self) -> list[str]:
        return list(self.meta.get("views", ["orig"]))

    @property
    def labeled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def __len__(self) -> int:
        return len(self.tokens)


def write_token_dir(
    out: str | os.PathLike | OutputDir,
    tokens: np.ndarray,
    labels: np.ndarray | None,
    *,
    vocab_size: int,
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    views: list[str] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write a token directory atomically (a staging directory renamed into place). A plain path may replace only an
    earlier token directory (see `digit.utils.outputs`); the CLI passes its own ``OutputDir``."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [N, h, w], got shape {tokens.shape}")
    n = len(tokens)
    if n and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids outside [0, {vocab_size})")
    labels = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}], got {labels.shape}")
    views = views or ["orig"]
    if n % len(views):
        raise ValueError(f"{n} rows do not split into {len(views)} views")
    class_names = list(class_names or [])
    if num_classes is None:
        num_classes = len(class_names)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "grid": [int(tokens.shape[1]), int(tokens.shape[2])],
        "vocab_size": int(vocab_size),
        "num_classes": int(num_classes),
        "class_names": class_names,
        "views": views,
        "n_images": n // len(views),
        "n_rows": n,
        **(extra_meta or {}),
    }
    target = as_output(out, "tokens")
    with target.stage() as tmp:
        atomic_save_numpy(tmp / "tokens.npy", tokens.astype(token_dtype(vocab_size), copy=False))
        atomic_save_numpy(tmp / "labels.npy", labels)
        atomic_write_json(tmp / "meta.json", meta)
    return target.path


def read_token_dir(path: str | os.PathLike, mmap: bool = True) -> TokenDirectory:
    path = Path(path)
    if not path.is_dir():
        raise DigitError(f"token directory not found: {path}")
    missing = [f for f in ("tokens.npy", "labels.npy", "meta.json") if not (path / f).is_file()]
    if missing:
        raise DigitError(f"{path} is not a token directory (missing {', '.join(missing)})")
    meta = read_json(path / "meta.json")
    if meta.get("format", FORMAT) != FORMAT:
        raise DigitError(f"{path}: unknown format {meta.get('format')!r}")
    tokens = np.load(path / "tokens.npy", mmap_mode="r" if mmap else None)
    labels = np.load(path / "labels.npy")
    if tokens.ndim != 3 or len(labels) != len(tokens):
        raise DigitError(f"{path}: tokens {tokens.shape} and labels {labels.shape} do not match")
    if list(tokens.shape[1:]) != list(meta["grid"]):
        raise DigitError(f"{path}: tokens grid {tokens.shape[1:]} differs from meta grid {meta['grid']}")
    return TokenDirectory(path=path, tokens=tokens, labels=labels, meta=meta)

"""The token directory: the one on-disk format for token grids, written by `digit tokenize` and `digit sample`.

    tokens.npy   [N, h, w]  uint16 when vocab_size <= 65536, else int32 (np.load(mmap_mode="r") friendly)
    labels.npy   [N]        int64, -1 when unlabeled
    meta.json    grid, vocab_size, num_classes, class_names, views, n_images, tokenizer config, source, skipped counts, ...

With several views (e.g. `--flip`), rows are stacked view-major: row ``v * n_images + i`` is view ``views[v]`` of image
``i``; labels are repeated per view. Every row is a training sample.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from digit.errors import DigitError
from digit.utils.artifacts import (
    GRID,
    INT,
    OBJECT,
    POSITIVE_INT,
    STR,
    STR_LIST,
    Kind,
    int_range,
    load_npy,
    read_json_object,
)
from digit.utils.io import atomic_save_numpy, atomic_write_json
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
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a token directory atomically (a staging directory renamed into place). A plain path may replace only an
    earlier token directory (see `digit.utils.outputs`); the CLI passes its own ``OutputDir``. ``add_files`` is called
    with the staging directory once tokens and meta are in it (caption features go in before the rename)."""
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
        if add_files is not None:
            add_files(tmp)
    return target.path


META_SCHEMA = {
    "format?": STR,
    "grid": GRID,
    "vocab_size": POSITIVE_INT,
    "num_classes?": INT,
    "class_names?": STR_LIST,
    "views?": STR_LIST,
    "n_images?": INT,
    "n_rows?": INT,
    "tokenizer?": OBJECT,
    "source?": Kind("an object or a string", lambda v: isinstance(v, (dict, str))),  # `digit sample` names itself
}


def read_token_dir(path: str | os.PathLike, mmap: bool = True) -> TokenDirectory:
    """Open and check a token directory: meta.json's keys, tokens' dtype / shape / id range, labels against both."""
    path = Path(path)
    if not path.is_dir():
        raise DigitError(f"token directory not found: {path}")
    missing = [f for f in ("tokens.npy", "labels.npy", "meta.json") if not (path / f).is_file()]
    if missing:
        raise DigitError(f"{path} is not a token directory (missing {', '.join(missing)})")
    meta_path, tokens_path, labels_path = path / "meta.json", path / "tokens.npy", path / "labels.npy"
    meta = read_json_object(meta_path, META_SCHEMA)
    if meta.get("format", FORMAT) != FORMAT:
        raise DigitError(f"{meta_path}: unknown format {meta.get('format')!r}")
    # float ids would be truncated silently on the way to an embedding table: only integer files are token files
    tokens = load_npy(tokens_path, kinds="ui", ndim=3, mmap=mmap, what="token array")
    labels = load_npy(labels_path, kinds="ui", ndim=1, what="label array")
    if list(tokens.shape[1:]) != list(meta["grid"]):
        raise DigitError(f"{tokens_path}: grid {list(tokens.shape[1:])} differs from meta.json's {meta['grid']}")
    if len(labels) != len(tokens):
        raise DigitError(f"{labels_path}: {len(labels)} labels for {len(tokens)} token rows")
    if meta.get("n_rows") is not None and meta["n_rows"] != len(tokens):
        raise DigitError(f"{meta_path}: n_rows {meta['n_rows']}, but tokens.npy holds {len(tokens)} rows")
    lo, hi = int_range(tokens)
    if lo < 0 or hi >= meta["vocab_size"]:
        raise DigitError(f"{tokens_path}: ids span [{lo}, {hi}], outside the vocabulary [0, {meta['vocab_size']})")
    lo, hi = int_range(labels)
    n_cls = meta.get("num_classes") or 0
    if lo < -1 or (n_cls and hi >= n_cls):
        raise DigitError(f"{labels_path}: labels span [{lo}, {hi}], outside -1 (unlabeled) .. {max(n_cls - 1, 0)}")
    return TokenDirectory(path=path, tokens=tokens, labels=np.asarray(labels, dtype=np.int64), meta=meta)


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two tokenizer configs name the same codebook (the codebook fingerprint when both have one)."""
    fa, fb = a.get("codebook_fingerprint"), b.get("codebook_fingerprint")
    if fa is not None and fb is not None:
        return fa == fb
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_provenance(tokens: TokenDirectory, trained_meta: dict[str, Any] | None, what: str) -> None:
    """Refuse tokens made by another tokenizer than the one a model was trained on (``trained_meta``: the token
    directory meta recorded in the run's config). Equal K and grid are not enough: another codebook's id 7 is another
    centroid. Checked only when both sides record their tokenizer, as `digit generate` does."""
    trained = (trained_meta or {}).get("tokenizer")
    given = tokens.meta.get("tokenizer")
    if isinstance(trained, dict) and isinstance(given, dict) and not same_tokenizer(given, trained):
        fp = given.get("codebook_fingerprint"), trained.get("codebook_fingerprint")
        detail = f" (codebook {fp[0]} vs {fp[1]})" if all(fp) else ""
        raise DigitError(f"{tokens.path}: made by another tokenizer than the {what} the run was trained on{detail}")


def class_label_map(train: TokenDirectory, other: TokenDirectory) -> np.ndarray | None:
    """Labels of ``other`` as ``train``'s class ids, by class name: a folder's class ids are positions among the
    classes it holds, so a held-out split that lacks one class numbers the rest differently. None when the two
    name the same classes in the same order (or either names none); a class ``train`` lacks is refused."""
    a, b = train.class_names, other.class_names
    if not a or not b or a == b:
        return None
    index = {name: i for i, name in enumerate(a)}
    missing = [name for name in b if name not in index]
    if missing:
        raise DigitError(f"{other.path}: class(es) {', '.join(missing[:5])} are not among {train.path}'s classes")
    return np.asarray([index[name] for name in b], dtype=np.int64)

"""Tokenizing an image source into a token directory, in one process or sharded under torchrun (rank 0 merges)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from digit.data.datasets import SkipReport, StreamingImageDataset, image_loader
from digit.data.sources import ImageSource
from digit.data.text_features import CaptionTask
from digit.data.tokens import token_dtype, write_token_dir
from digit.errors import DigitError
from digit.utils.distributed import barrier, get_dist_info
from digit.utils.io import atomic_write_json, read_json
from digit.utils.outputs import OutputDir, as_output


def tokenize_shard(
    tokenizer,
    source: ImageSource,
    *,
    batch_size: int = 64,
    workers: int = 0,
    flip: bool = False,
    strict: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """This rank's share: {"indices" [n], "tokens" [V, n, h, w], "failures" [(index, reason)]}."""
    ds = StreamingImageDataset(source, tokenizer.image_size, train=False, limit=limit)
    loader = image_loader(ds, batch_size, workers)
    report = SkipReport(source, strict=strict)
    report.skipped.clear()  # loose files are reported once, by the merge
    dist = get_dist_info()
    indices, views, failures = [], [[] for _ in range(2 if flip else 1)], []
    total = (len(ds) + dist.world_size - 1 - dist.rank) // dist.world_size
    with tqdm(total=total, desc="tokenize", unit="img", disable=not (progress and dist.is_main)) as bar:
        for batch in loader:
            report.add(batch["failures"])  # raises at once under --strict
            failures.extend(batch["failures"])
            bar.update(len(batch["indices"]) + len(batch["failures"]))
            if not len(batch["indices"]):
                continue
            x = tokenizer.normalize(batch["images"])
            views[0].append(tokenizer.encode_normalized(x).cpu())
            if flip:
                # the flipped view is the flip of the same crop (LlamaGen's augmentation)
                views[1].append(tokenizer.encode_normalized(torch.flip(x, dims=[-1])).cpu())
            indices.append(batch["indices"])
    h, w = tokenizer.grid_size
    dtype = token_dtype(tokenizer.vocab_size)
    return {
        "indices": torch.cat(indices).numpy() if indices else np.zeros(0, np.int64),
        "tokens": np.stack([torch.cat(v).numpy().astype(dtype) if v else np.zeros((0, h, w), dtype) for v in views]),
        "failures": failures,
    }


def _merge(
    parts: list[dict[str, Any]], source: ImageSource, n_views: int
) -> tuple[np.ndarray, np.ndarray, list, np.ndarray]:
    indices = np.concatenate([p["indices"] for p in parts])
    tokens = np.concatenate([p["tokens"] for p in parts], axis=1)  # [V, n, h, w]
    if len(np.unique(indices)) != len(indices):
        raise RuntimeError("shards overlap: an image was tokenized by more than one rank")
    order = np.argsort(indices, kind="stable")
    indices, tokens = indices[order], tokens[:, order]
    failures = sorted((f for p in parts for f in p["failures"]), key=lambda f: f[0])
    tokens = tokens.reshape(n_views * len(indices), *tokens.shape[2:])
    labels = np.tile(source.labels[indices], n_views)
    return tokens, labels, failures, indices


def tokenize_to_dir(
    tokenizer,
    source: ImageSource,
    out: str | os.PathLike | OutputDir,
    *,
    batch_size: int = 64,
    workers: int = 0,
    flip: bool = False,
    strict: bool = False,
    limit: int | None = None,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    captions: CaptionTask | None = None,
) -> SkipReport | None:
    """Write the token directory (rank 0). Under torchrun every rank tokenizes its shard and rank 0 merges them."""
    dist = get_dist_info()
    target = as_output(out, "tokens")
    out = target.path
    shard_dir = out.with_name(f".{out.name}.shards")
    if dist.enabled:  # shards or error notes of an earlier, killed run must not be merged into this one
        if dist.is_main:
            shutil.rmtree(shard_dir, ignore_errors=True)
        barrier()
    try:
        part = tokenize_shard(
            tokenizer,
            source,
            batch_size=batch_size,
            workers=workers,
            flip=flip,
            strict=strict,
            limit=limit,
            progress=progress,
        )
    except DigitError as e:
        if not dist.enabled:
            raise
        # tell the other ranks before meeting them at the barrier, so nobody waits for a shard that never comes
        shard_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(shard_dir / f"rank{dist.rank}.error.json", str(e))
        barrier()
        raise
    if dist.enabled:
        shard_dir.mkdir(parents=True, exist_ok=True)
        np.savez(shard_dir / f"rank{dist.rank}.npz", indices=part["indices"], tokens=part["tokens"])
        atomic_write_json(shard_dir / f"rank{dist.rank}.json", part["failures"])
        barrier()
        errors = sorted(shard_dir.glob("rank*.error.json"))
        if errors:
            raise DigitError(f"{errors[0].name.split('.')[0]}: {read_json(errors[0])}")
        if not dist.is_main:
            barrier()
            return None
        parts = []
        for r in range(dist.world_size):
            with np.load(shard_dir / f"rank{r}.npz") as z:
                parts.append(
                    {"indices": z["indices"], "tokens": z["tokens"], "failures": read_json(shard_dir / f"rank{r}.json")}
                )
    else:
        parts = [part]
    n_views = 2 if flip else 1
    tokens, labels, failures, kept = _merge(parts, source, n_views)
    report = SkipReport(source, strict=strict)
    report.add(failures)
    try:
        report.require_usable(len(tokens))
    except DigitError:
        if dist.enabled:  # release the ranks waiting for the merge
            shutil.rmtree(shard_dir, ignore_errors=True)
            barrier()
        raise
    meta = {
        "tokenizer": tokenizer.config(),
        "source": {
            "path": str(Path(source.path).resolve()),
            "n_files": len(source) if limit is None else min(limit, len(source)),
            # which images a --limit took (`spread_indices`); a directory made with the first N records none
            **({"limit": {"n": limit, "rule": "spread"}} if limit is not None and limit < len(source) else {}),
            **report.to_json(),
        },
        **(extra_meta or {}),
    }
    write_token_dir(
        target,
        tokens,
        labels if source.labeled else None,
        vocab_size=tokenizer.vocab_size,
        class_names=source.class_names,
        views=["orig", "flip"][:n_views],
        extra_meta=meta,
        add_files=None if captions is None else lambda tmp: captions.write(tmp, kept),
    )
    if dist.enabled:
        shutil.rmtree(out.with_name(f".{out.name}.shards"), ignore_errors=True)
        barrier()
    return report

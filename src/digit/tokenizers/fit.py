"""Fitting a discriminative tokenizer: stream training-style crops through the frozen encoder, keep a bounded sample
of patch features, run faiss K-means."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from digit.data.datasets import SkipReport, StreamingImageDataset, image_loader
from digit.data.sources import ImageSource
from digit.tokenizers.discriminative import DiscriminativeTokenizer, check_smooth, smooth_features
from digit.tokenizers.encoder import Encoder
from digit.tokenizers.kmeans import FeatureReservoir, fit_kmeans


@dataclass
class FitReport:
    n_images: int
    n_features_seen: int
    n_features_used: int
    skipped: SkipReport


def sample_patch_features(
    encoder: Encoder,
    source: ImageSource,
    *,
    sample_frac: float,
    max_points: int,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    strict: bool = False,
    augment: bool = True,
    limit: int | None = None,
    progress: bool = True,
    smooth: int = 1,
) -> tuple[np.ndarray, FitReport]:
    """-> (features [n, D] float32, report). Each image keeps round(sample_frac * h*w) random patches (>= 1).

    ``smooth`` > 1 samples the smoothed feature map (``smooth_features``), the same vectors the tokenizer encodes with.
    """
    check_smooth(smooth, encoder.grid_size)
    ds = StreamingImageDataset(source, encoder.image_size, train=augment, seed=seed, limit=limit, shard_by_rank=False)
    loader = image_loader(ds, batch_size, workers)
    reservoir = FeatureReservoir(max_points, encoder.embed_dim, seed=seed)
    skipped = SkipReport(source, strict=strict)
    hw = encoder.grid_size[0] * encoder.grid_size[1]
    keep = max(1, int(round(sample_frac * hw)))
    n_images = 0
    with torch.inference_mode(), tqdm(total=len(ds), desc="features", unit="img", disable=not progress) as bar:
        for batch in loader:
            skipped.add(batch["failures"])
            bar.update(len(batch["indices"]) + len(batch["failures"]))
            if not len(batch["indices"]):
                continue
            feats = encoder(encoder.normalize(batch["images"]))  # [B, hw, D]
            feats = smooth_features(feats, encoder.grid_size, smooth).cpu().numpy()
            # per-image patch choice and sampling keys from (seed, index): independent of batching and workers
            for f, i in zip(feats, batch["indices"].tolist()):
                rng = np.random.default_rng([seed, 1, i])
                reservoir.add(f[rng.choice(hw, size=keep, replace=False)], keys=rng.random(keep))
            n_images += len(batch["indices"])
    return reservoir.data.copy(), FitReport(n_images, reservoir.seen, len(reservoir.data), skipped)


def fit_tokenizer(
    encoder: Encoder,
    source: ImageSource,
    *,
    clusters: int,
    sample_frac: float = 0.1,
    max_points: int | None = None,
    niter: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    strict: bool = False,
    augment: bool = True,
    limit: int | None = None,
    progress: bool = True,
    smooth: int = 1,
) -> tuple[DiscriminativeTokenizer, FitReport]:
    max_points = max_points or clusters * 256
    feats, report = sample_patch_features(
        encoder,
        source,
        sample_frac=sample_frac,
        max_points=max_points,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        strict=strict,
        augment=augment,
        limit=limit,
        progress=progress,
        smooth=smooth,
    )
    report.skipped.require_usable(report.n_images)
    centroids = fit_kmeans(feats, clusters, niter=niter, seed=seed, verbose=False)
    extra = {
        "kmeans": {
            "clusters": clusters,
            "niter": niter,
            "seed": seed,
            "sample_frac": sample_frac,
            "max_points": max_points,
            "augment": augment,
            "n_images": report.n_images,
            "n_features_seen": report.n_features_seen,
            "n_features_used": report.n_features_used,
        },
        "fit_source": str(source.path),
    }
    return DiscriminativeTokenizer(encoder, centroids, extra=extra, smooth=smooth), report

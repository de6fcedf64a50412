"""K-means codebooks with faiss, fitted on patch features streamed from the data.

Memory stays bounded: each image contributes a random fraction of its patches, and a reservoir of at most
``max_points`` vectors (default K * 256, faiss's own ``max_points_per_centroid``) keeps a uniform sample of everything
streamed, so the fit costs the same memory for CIFAR and for ImageNet.
"""

from __future__ import annotations

import numpy as np

from digit.errors import DigitError


class FeatureReservoir:
    """Uniform sample (Algorithm R) of at most ``capacity`` D-dim vectors from a stream, in a preallocated buffer."""

    def __init__(self, capacity: int, dim: int, seed: int = 0):
        self.buffer = np.empty((capacity, dim), dtype=np.float32)
        self.capacity, self.seen, self.rng = capacity, 0, np.random.default_rng(seed)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        n = len(x)
        free = max(0, min(self.capacity - self.seen, n))
        if free:
            self.buffer[self.seen : self.seen + free] = x[:free]
        if free < n:
            # the j-th overall item (0-based) replaces a random slot with probability capacity / (j + 1)
            j = self.seen + np.arange(free, n)
            slots = (self.rng.random(n - free) * (j + 1)).astype(np.int64)
            keep = slots < self.capacity
            # later rows win when two rows draw the same slot, as they would one at a time
            self.buffer[slots[keep]] = x[free:][keep]
        self.seen += n

    @property
    def data(self) -> np.ndarray:
        return self.buffer[: min(self.seen, self.capacity)]


def fit_kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 1234, verbose: bool = False) -> np.ndarray:
    """faiss K-means (GPU when faiss has one) -> centroids float32 [k, D]."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if k < 1:
        raise DigitError(f"--clusters must be >= 1, got {k}")
    if len(x) < k:
        raise DigitError(
            f"K={k} is larger than the number of sampled features ({len(x)}): raise --sample-frac or use more images"
        )
    gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    # We already subsampled; stop faiss from subsampling again (its default caps at 256 points per centroid).
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=verbose, gpu=gpu, max_points_per_centroid=1 << 30)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)

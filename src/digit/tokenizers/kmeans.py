"""K-means codebooks with faiss, fitted on patch features streamed from the data.

Memory stays bounded: each image contributes a random fraction of its patches, and a reservoir of at most
``max_points`` vectors (default K * 256, faiss's own ``max_points_per_centroid``) keeps a uniform sample of everything
streamed, so the fit costs the same memory for CIFAR and for ImageNet. The sample depends on the seed only, not on
batch size or DataLoader workers.
"""

from __future__ import annotations

import numpy as np

from digit.errors import DigitError


class FeatureReservoir:
    """A uniform sample of at most ``capacity`` D-dim vectors from a stream, independent of the arrival order.

    Each row carries a random key drawn from its own seed (the caller uses (seed, image index)), and the ``capacity``
    smallest keys are kept (bottom-k sampling). So DataLoader worker interleaving cannot change the sample, and memory
    stays under ~2x capacity rows: pending rows are pruned whenever they reach ``capacity``.
    """

    def __init__(self, capacity: int, dim: int, seed: int = 0):
        self.capacity, self.dim, self.seen = capacity, dim, 0
        self.rng = np.random.default_rng(seed)  # keys for rows added without their own
        self._keys = np.empty(0, dtype=np.float64)
        self._rows = np.empty((0, dim), dtype=np.float32)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._n_pending = 0

    def add(self, x: np.ndarray, keys: np.ndarray | None = None) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.dim)
        keys = self.rng.random(len(x)) if keys is None else np.asarray(keys, dtype=np.float64)
        if keys.shape != (len(x),):
            raise ValueError(f"need one key per row: {keys.shape} for {len(x)} rows")
        self._pending.append((keys, x))
        self._n_pending += len(x)
        self.seen += len(x)
        if self._n_pending >= self.capacity:
            self._prune()

    def _prune(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self._keys, *(k for k, _ in self._pending)])
        rows = np.concatenate([self._rows, *(r for _, r in self._pending)])
        self._pending, self._n_pending = [], 0
        keep = np.argpartition(keys, self.capacity - 1)[: self.capacity] if len(keys) > self.capacity else slice(None)
        keys, rows = keys[keep], rows[keep]
        order = np.argsort(keys, kind="stable")  # a canonical order, whatever order the rows came in
        self._keys, self._rows = keys[order], rows[order]

    @property
    def data(self) -> np.ndarray:
        self._prune()
        return self._rows


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

"""Reference statistics: mu/sigma of a feature space over a reference image set, cached as .npz, plus provenance.

Our file: ``mu`` float64 [D], ``sigma`` float64 [D, D], ``count`` int64, ``meta`` (a JSON string: feature extractor and
its weights hash, source, protocol, resolution, image hash), optionally ``features`` float32 [N, D] for KID/PRC.
ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``) are read directly: their stored ``mu``/``sigma`` are the
statistics (TF Inception pool_3 over the ImageNet train set; ``arr_0`` holds 10k images for precision/recall only).
Everything loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from digit.errors import DigitError
from digit.utils.io import atomic_write

STATS_FORMAT = "digit.fid-stats"
STATS_FORMAT_VERSION = 1


def stats_hash(mu: np.ndarray, sigma: np.ndarray) -> str:
    """A content hash of the statistics themselves (float64 bytes), independent of the file they came in."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(mu, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(sigma, dtype=np.float64).tobytes())
    return h.hexdigest()


@dataclass
class ReferenceStats:
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    count: int | None  # images behind the statistics (None when the file does not say, as in ADM's)
    meta: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None  # [N, D] when kept (needed for KID / precision-recall)
    path: Path | None = None

    @property
    def sha256(self) -> str:
        return stats_hash(self.mu, self.sigma)

    def as_reference(self) -> dict[str, Any]:
        """The dict ``fid.compute_metrics`` takes as ``ref``."""
        return {"mu": self.mu, "sigma": self.sigma, "pool": self.features}

    def describe(self) -> dict[str, Any]:
        out = {
            "path": str(self.path) if self.path else None,
            "kind": "stats",
            "count": self.count,
            "stats_sha256": self.sha256,
            "dim": int(len(self.mu)),
        }
        out["resolution"] = self.meta.get("resolution")
        for k in ("source", "protocol", "feature_extractor", "images_sha256", "format"):
            if k in self.meta:
                out[k] = self.meta[k]
        return out

    def save(self, path: str | os.PathLike, keep_features: bool = False) -> Path:
        meta = {"format": STATS_FORMAT, "format_version": STATS_FORMAT_VERSION, **self.meta}
        arrays: dict[str, np.ndarray] = {
            "mu": np.asarray(self.mu, np.float64),
            "sigma": np.asarray(self.sigma, np.float64),
            "count": np.asarray(-1 if self.count is None else self.count, np.int64),
            "meta": np.asarray(json.dumps(meta)),
        }
        if keep_features and self.features is not None:
            arrays["features"] = np.asarray(self.features, np.float32)

        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez(f, **arrays)

        return atomic_write(path, write)


def npz_member_shape(path: str | os.PathLike, key: str) -> tuple[int, ...]:
    """The shape of one array in an .npz from its header alone (ADM's arr_0 is 10k images: never load it for this)."""
    import zipfile

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(f)
    return tuple(int(d) for d in shape)


def load_stats(path: str | os.PathLike) -> ReferenceStats:
    """Read our statistics file or ADM's reference batch (keys mu, sigma)."""
    path = Path(path)
    if not path.is_file():
        raise DigitError(f"statistics file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"mu", "sigma"} <= keys:
                raise DigitError(f"{path}: no statistics (keys mu, sigma) in {sorted(keys)}")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            count = int(z["count"]) if "count" in keys else None
            meta = json.loads(str(z["meta"])) if "meta" in keys else {}
            features = z["features"] if "features" in keys else None
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise DigitError(f"cannot read statistics {path}: {e}") from e
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise DigitError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not [D] / [D, D]")
    if count is not None and count < 0:
        count = None
    if "meta" not in keys:
        # ADM evaluator file (guided-diffusion/evaluations): statistics of TF Inception pool_3; mu_s/sigma_s are the
        # spatial (sFID) statistics, arr_0 a batch of reference images (its shape gives the resolution).
        shape = npz_member_shape(path, "arr_0") if "arr_0" in keys else None
        meta = {
            "format": "adm-reference-batch",
            "protocol": "adm-ref",
            "feature_extractor": {
                "name": "adm-tf-inception-v3-pool3",
                "note": "TF Inception; torch-fidelity's inception-v3-compat matches it closely, not bit-exactly",
            },
            "resolution": [int(shape[1]), int(shape[2])] if shape is not None and len(shape) == 4 else None,
            "reference_batch_images": int(shape[0]) if shape is not None else None,
        }
    return ReferenceStats(mu=mu, sigma=sigma, count=count, meta=meta, features=features, path=path)


def library_versions() -> dict[str, str]:
    """Versions of everything a metric value depends on."""
    import scipy
    import torch
    import torch_fidelity

    from digit import __version__

    return {
        "digit": __version__,
        "torch_fidelity": torch_fidelity.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def check_comparable(
    gen: dict[str, Any], ref: dict[str, Any], min_images: int, force: bool, ref_min_images: int | None = None
) -> list[str]:
    """Refuse (DigitError) sets of different resolution or too few images; with ``force`` return the reasons instead."""
    problems = []
    g_res, r_res = gen.get("resolution"), ref.get("resolution")
    if g_res is not None and r_res is not None and list(g_res) != list(r_res):
        problems.append(f"resolution differs: generated {g_res[0]}x{g_res[1]} vs reference {r_res[0]}x{r_res[1]}")
    if gen.get("count") is not None and gen["count"] < min_images:
        problems.append(f"only {gen['count']} generated images (minimum {min_images})")
    rmin = min_images if ref_min_images is None else ref_min_images
    if ref.get("count") is not None and ref["count"] < rmin:
        problems.append(f"only {ref['count']} reference images (minimum {rmin})")
    if problems and not force:
        raise DigitError("; ".join(problems) + " (pass --force to compute anyway; the result will be marked)")
    return problems

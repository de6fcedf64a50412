"""Distribution metrics between a generated and a reference image set.

The Fréchet distance is computed here, in float64 with scipy's ``sqrtm`` and the safeguards of the reference FID code
(TTUR / pytorch-fid: an eps offset on the diagonal when the product is singular, the imaginary part of the root dropped
only when it is round-off). IS, KID and precision/recall are torch-fidelity's own functions (the evaluator DiGIT used),
applied to features that ``digit.evaluation.features`` extracted once, so every metric of one call sees the same
features.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from digit.errors import DigitError

# Metric names as they appear in result JSON (plain names; torch-fidelity's long keys are mapped onto them).
METRICS = ("fid", "is", "kid", "prc")


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features -> (mu [D], sigma [D, D]) in float64; sigma is the unbiased covariance, as in TTUR/torch-fidelity."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise DigitError(f"need at least 2 feature vectors [N, D] for statistics, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64."""
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise DigitError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape} "
            "(different feature extractors?)"
        )
    # Identical statistics are distance 0 exactly; sqrtm round-off would otherwise give +-1e-10.
    if np.array_equal(mu1, mu2) and np.array_equal(sigma1, sigma2):
        return 0.0
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # A singular product only warns; it is handled by the finiteness check and the eps offset below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): regularise as TTUR's fid.py does.
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > 1e-3:
            raise DigitError(f"Fréchet distance: matrix square root has a large imaginary part ({max_imag:.3g})")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    # The distance is non-negative; a tiny negative value is round-off of near-identical statistics.
    return max(value, 0.0)


def inception_score(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> dict[str, float]:
    """torch-fidelity's IS on Inception logits (``logits_unbiased``, as torch-fidelity uses): mean and std over splits."""
    import torch
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    n = len(logits)
    if n < splits:
        raise DigitError(f"inception score with {splits} splits needs at least {splits} images, got {n}")
    out = isc_features_to_metric(torch.as_tensor(np.asarray(logits)), splits=splits, shuffle=True, rng_seed=seed)
    return {"is": out[KEY_METRIC_ISC_MEAN], "is_std": out[KEY_METRIC_ISC_STD]}


def kernel_distance(
    gen: np.ndarray, ref: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> dict[str, float]:
    """torch-fidelity's KID (unbiased MMD^2, cubic polynomial kernel) over random subsets."""
    import torch
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    if min(len(gen), len(ref)) < subset_size:
        raise DigitError(f"KID subset size {subset_size} exceeds the smaller set ({min(len(gen), len(ref))} images)")
    out = kid_features_to_metric(
        torch.as_tensor(np.asarray(gen)),
        torch.as_tensor(np.asarray(ref)),
        kid_subsets=subsets,
        kid_subset_size=subset_size,
        rng_seed=seed,
        verbose=False,
    )
    return {"kid": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD]}


def precision_recall(gen: np.ndarray, ref: np.ndarray, neighborhood: int = 3) -> dict[str, float]:
    """torch-fidelity's improved precision/recall (Kynkäänniemi et al. 2019), k-NN balls of ``neighborhood``.

    Computed on the same features as FID (Inception pool3 by default), as ADM's evaluator does, rather than
    torch-fidelity's VGG16 default: one extractor, one weights file, one provenance entry.
    """
    import torch
    from torch_fidelity.metric_prc import (
        KEY_METRIC_F_SCORE,
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    if min(len(gen), len(ref)) <= neighborhood:
        raise DigitError(f"precision/recall with k={neighborhood} needs more than {neighborhood} images per set")
    out = prc_features_to_metric(
        torch.as_tensor(np.asarray(gen, np.float32)),
        torch.as_tensor(np.asarray(ref, np.float32)),
        prc_neighborhood=neighborhood,
        prc_batch_size=10000,
        save_cpu_ram=len(gen) * len(ref) > 10000 * 10000,
        verbose=False,
    )
    return {
        "precision": out[KEY_METRIC_PRECISION],
        "recall": out[KEY_METRIC_RECALL],
        "f_score": out[KEY_METRIC_F_SCORE],
    }


def parse_metrics(value: str) -> list[str]:
    """'fid,is,prc' -> ['fid', 'is', 'prc']; 'isc' is accepted for torch-fidelity users."""
    names = [m.strip().lower() for m in value.split(",") if m.strip()]
    names = ["is" if m == "isc" else m for m in names]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise DigitError(f"unknown metric(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def compute_metrics(
    metrics: list[str],
    gen: dict[str, np.ndarray],
    ref: dict[str, Any],
    *,
    fd_name: str = "fid",
    isc_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    seed: int = 2020,
) -> dict[str, float]:
    """Metrics from extracted features.

    ``gen``: {"pool": [N, D], "logits": [N, C] (Inception only)}. ``ref``: {"mu", "sigma"} and, for KID/PRC,
    {"pool": [M, D]}. ``fd_name`` names the Fréchet distance in the output ("fid" for Inception, "fd" otherwise).
    """
    out: dict[str, float] = {}
    if "is" in metrics:
        if gen.get("logits") is None:
            raise DigitError("inception score needs the Inception classifier (--features inception)")
        out.update(inception_score(gen["logits"], splits=isc_splits, seed=seed))
    if "fid" in metrics:
        mu, sigma = feature_statistics(gen["pool"])
        out[fd_name] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    for name in ("kid", "prc"):
        if name in metrics and ref.get("pool") is None:
            raise DigitError(f"{name} needs reference features, not only statistics (use an image set as --ref)")
    if "kid" in metrics:
        out.update(kernel_distance(gen["pool"], ref["pool"], kid_subsets, kid_subset_size, seed))
    if "prc" in metrics:
        out.update(precision_recall(gen["pool"], ref["pool"], prc_neighborhood))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# End to end: image sets in, result JSON (metrics + provenance) out.


def _extractor_matches(stats_meta: dict[str, Any], extractor: Any) -> bool:
    fe = stats_meta.get("feature_extractor") or {}
    if fe.get("name") == "adm-tf-inception-v3-pool3":  # TF Inception pool3 vs torch-fidelity's compat port
        return getattr(extractor, "fd_name", "") == "fid" and getattr(extractor, "layer", "") == "2048"
    same_layer = (fe.get("layers") or {}).get("fid/kid/prc") == getattr(extractor, "layer", None)
    return fe.get("weights_sha256") == getattr(extractor, "sha256", None) and same_layer


def reference_stats(
    ref: str,
    extractor: Any,
    *,
    image_size: int | None = None,
    protocol: str | None = None,
    batch_size: int = 50,
    workers: int = 0,
):
    """Features of a reference image set -> ReferenceStats (features kept in memory; saved only on request)."""
    from digit.evaluation.features import extract_features
    from digit.evaluation.images import NPZ_AS_STORED, open_image_set, preprocess_record
    from digit.evaluation.stats import ReferenceStats, library_versions

    image_set = open_image_set(ref, image_size=image_size)
    feats, info = extract_features(image_set, extractor, batch_size, workers, "reference", logits=False)
    mu, sigma = feature_statistics(feats["pool"])
    meta = {
        "source": image_set.describe(),
        "protocol": protocol,
        "preprocess": NPZ_AS_STORED if image_set.kind == "npz" else preprocess_record(image_size),
        "resolution": info["resolution"],
        "images_sha256": info["images_sha256"],
        "feature_extractor": extractor.describe(),
        "versions": library_versions(),
    }
    meta["source"]["resolution"] = info["resolution"]
    return ReferenceStats(mu=mu, sigma=sigma, count=info["count"], meta=meta, features=feats["pool"])


def evaluate(
    gen: str,
    ref: str | None,
    extractor: Any,
    metrics: list[str],
    *,
    protocol: str | None = None,
    image_size: int | None = None,
    min_images: int = 10000,
    force: bool = False,
    batch_size: int = 50,
    workers: int = 0,
    isc_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    seed: int = 2020,
) -> dict[str, Any]:
    """Compare a generated set with a reference (image set or statistics file): {metric: value, ..., "provenance"}.

    ``extractor``: a feature extractor (``digit.evaluation.features``) or a zero-argument function building one.
    """
    from pathlib import Path

    from digit.evaluation.features import extract_features
    from digit.evaluation.images import NPZ_AS_STORED, get_protocol, npz_kind, open_image_set, preprocess_record
    from digit.evaluation.stats import check_comparable, library_versions, load_stats, stats_hash

    proto = get_protocol(protocol)
    ref_size = image_size if image_size is not None else (proto.image_size if proto else None)
    if proto is not None:
        min_images = max(min_images, proto.min_images)
    gen_set = open_image_set(gen)
    gen_desc = gen_set.describe()
    stats = ref_set = None
    if ref is None:  # the inception score needs no reference
        if set(metrics) - {"is"}:
            raise DigitError(f"{', '.join(m for m in metrics if m != 'is')} need a reference (--ref)")
        ref_desc: dict[str, Any] = {"count": None, "resolution": None}
    elif Path(ref).is_file() and Path(ref).suffix == ".npz" and npz_kind(Path(ref)) == "stats":
        stats = load_stats(ref)
        ref_desc = stats.describe()
        if stats.features is None and {"kid", "prc"} & set(metrics):
            raise DigitError(
                "kid/prc need reference features, not only statistics (use an image set as --ref, or a statistics "
                "file made with `digit eval stats --keep-features`)"
            )
    else:
        ref_set = open_image_set(ref, image_size=ref_size)
        ref_desc = ref_set.describe()
    problems = check_comparable(gen_desc, ref_desc, min_images, force)  # counts (and sizes when known) before the work
    if not hasattr(extractor, "describe"):  # a factory: load the network only once the cheap checks passed
        extractor = extractor()
    if stats is not None:
        mismatch = []
        if not _extractor_matches(stats.meta, extractor):
            mismatch.append("reference statistics were computed with a different feature extractor (weights or layer)")
        if proto is not None and stats.meta.get("protocol") not in (None, proto.name):
            mismatch.append(f"reference statistics follow protocol {stats.meta.get('protocol')!r}, not {proto.name!r}")
        # statistics older than the record say nothing, so only a recorded, different preparation is refused
        stored = stats.meta.get("preprocess")
        if ref_size is not None and stored not in (None, NPZ_AS_STORED, preprocess_record(ref_size)):
            mismatch.append(f"reference statistics were prepared as {stored!r}, not {preprocess_record(ref_size)!r}")
        res = stats.meta.get("resolution")
        if image_size is not None and res is not None and list(res) != [image_size, image_size]:
            mismatch.append(f"reference statistics are {res[0]}x{res[1]}, not --image-size {image_size}")
        if mismatch and not force:
            raise DigitError("; ".join(mismatch) + " (pass --force to compute anyway)")
        problems += mismatch

    gen_feats, gen_info = extract_features(gen_set, extractor, batch_size, workers, desc="generated")
    gen_desc.update(resolution=gen_info["resolution"], images_sha256=gen_info["images_sha256"])
    ref_arrays: dict[str, Any] = {"pool": None}
    if stats is not None:
        ref_arrays = stats.as_reference()
    elif ref_set is not None:
        ref_feats, ref_info = extract_features(ref_set, extractor, batch_size, workers, "reference", logits=False)
        mu, sigma = feature_statistics(ref_feats["pool"])
        ref_arrays = {"mu": mu, "sigma": sigma, "pool": ref_feats["pool"]}
        ref_desc.update(
            resolution=ref_info["resolution"],
            images_sha256=ref_info["images_sha256"],
            stats_sha256=stats_hash(mu, sigma),
        )
    problems = list(dict.fromkeys(problems + check_comparable(gen_desc, ref_desc, min_images, force)))

    n_min = min(len(gen_feats["pool"]), len(ref_arrays["pool"]) if ref_arrays["pool"] is not None else 10**12)
    options = {
        "isc_splits": min(isc_splits, len(gen_feats["pool"])),
        "kid_subsets": kid_subsets,
        "kid_subset_size": min(kid_subset_size, n_min),
        "prc_neighborhood": prc_neighborhood,
        "seed": seed,
        "batch_size": batch_size,
        "min_images": min_images,
    }
    values = compute_metrics(
        metrics,
        gen_feats,
        ref_arrays,
        fd_name=extractor.fd_name,
        isc_splits=options["isc_splits"],
        kid_subsets=kid_subsets,
        kid_subset_size=options["kid_subset_size"],
        prc_neighborhood=prc_neighborhood,
        seed=seed,
    )
    import datetime

    provenance = {
        "versions": library_versions(),
        "metric_implementations": {
            "fid": "digit.evaluation.fid.frechet_distance (float64, scipy.linalg.sqrtm, TTUR safeguards)",
            "is": "torch_fidelity.metric_isc",
            "kid": "torch_fidelity.metric_kid (poly kernel, degree 3)",
            "prc": "torch_fidelity.metric_prc (k-NN manifolds on the FID features)",
        },
        "metrics_requested": metrics,
        "feature_extractor": extractor.describe(),
        "protocol": proto.name if proto else None,
        "generated": gen_desc,
        "reference": ref_desc,
        "options": options,
        "forced": bool(problems),
        "problems": problems,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return {**values, "provenance": provenance}

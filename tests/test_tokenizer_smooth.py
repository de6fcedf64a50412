"""Feature smoothing (`tokenizer fit --smooth K`): the formula, the fit/encode path, old files, refusals, stability."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY_IMAGE_SIZE, TINY_VIT, TINY_VIT_KWARGS, tiny_fit_argv, write_image_folder
from digit.cli import main
from digit.data.datasets import StreamingImageDataset, image_loader
from digit.data.sources import open_image_source
from digit.errors import DigitError
from digit.evaluation.stability import token_stability
from digit.tokenizers import load_tokenizer
from digit.tokenizers.discriminative import DiscriminativeTokenizer, nearest_centroid, smooth_features
from digit.tokenizers.encoder import build_encoder
from digit.tokenizers.fit import sample_patch_features

pytestmark = pytest.mark.filterwarnings("ignore:RANDOM-INIT")


def tiny_encoder(seed=0):
    kw = dict(TINY_VIT_KWARGS, depth=2)
    return build_encoder(TINY_VIT, kw, random_init=True, image_size=TINY_IMAGE_SIZE, layer=1, seed=seed)


def loop_smooth(fmap: np.ndarray, kernel: int) -> np.ndarray:
    """[B, h, w, D] -> [B, h*w, D]: explicit mean over the in-bounds kernel x kernel neighbourhood, then (x-mu)/sd."""
    b, h, w, d = fmap.shape
    r = kernel // 2
    out = np.zeros((b, h, w, d))
    for n in range(b):
        for i in range(h):
            for j in range(w):
                cells = [fmap[n, y, x] for y in range(i - r, i + r + 1) for x in range(j - r, j + r + 1)
                         if 0 <= y < h and 0 <= x < w]  # fmt: skip
                v = np.mean(cells, axis=0)
                out[n, i, j] = (v - v.mean()) / np.sqrt(v.var() + 1e-5)
    return out.reshape(b, h * w, d)


@pytest.mark.parametrize("kernel", [3, 5])
def test_smoothed_features_equal_loop_mean_then_layer_norm(kernel):
    grid = (5, 6)  # not square: catches a transposed reshape
    fmap = np.random.default_rng(kernel).normal(size=(2, *grid, 7)) * np.arange(1, 8)
    feats = torch.from_numpy(fmap.reshape(2, 30, 7)).float()
    got = smooth_features(feats, grid, kernel)
    assert got.shape == (2, 30, 7)
    np.testing.assert_allclose(got.numpy(), loop_smooth(fmap, kernel), rtol=1e-4, atol=1e-4)
    assert smooth_features(feats, grid, 1) is feats  # off: untouched, no layer norm


@pytest.fixture
def images(tmp_path):
    return write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), n_per_class=4, size=(60, 70))


def _batch(root) -> torch.Tensor:
    src = open_image_source(str(root))
    ds = StreamingImageDataset(src, TINY_IMAGE_SIZE, train=False, seed=0, shard_by_rank=False)
    return torch.cat([b["images"] for b in image_loader(ds, 5, 0)])


def test_fit_save_load_encode_round_trip_with_smooth3(images, tmp_path):
    out = tmp_path / "tok"
    argv = tiny_fit_argv(images, out, 8, "--sample-frac", "1", "--niter", "5", "--no-augment", "--smooth", "3")
    assert main(argv) == 0
    assert json.loads((out / "tokenizer.json").read_text())["smooth"] == 3
    tok = load_tokenizer(out)
    assert isinstance(tok, DiscriminativeTokenizer) and tok.smooth == 3
    x = _batch(images)
    feats = smooth_features(tok.encoder(tok.normalize(x)), tok.grid_size, 3)
    want = nearest_centroid(feats.reshape(-1, 64), tok.centroids, tok.c_sqnorm).view(-1, 4, 4)
    ids = tok.encode(x)
    assert torch.equal(ids, want)
    assert not torch.equal(feats, tok.encoder(tok.normalize(x)))  # smoothing really is on the encode path
    tok.save(tmp_path / "again")
    assert torch.equal(load_tokenizer(tmp_path / "again").encode(x), ids)
    # K-means saw the same smoothed vectors: with every patch kept and no augmentation, the sample is exactly them
    sample, _ = sample_patch_features(
        tok.encoder, open_image_source(str(images)), sample_frac=1.0, max_points=10_000, augment=False,
        progress=False, smooth=3,
    )  # fmt: skip
    rows = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_allclose(rows(sample), rows(feats.reshape(-1, 64).numpy()), atol=1e-5)


def test_unsmoothed_tokens_and_old_files_unchanged(images, tmp_path):
    out = tmp_path / "tok"
    assert main(tiny_fit_argv(images, out, 8, "--sample-frac", "1", "--niter", "5")) == 0
    cfg = json.loads((out / "tokenizer.json").read_text())
    assert "smooth" not in cfg  # files of unsmoothed tokenizers look as before
    tok = load_tokenizer(out)
    assert tok.smooth == 1
    x = _batch(images)
    raw = tok.encoder(tok.normalize(x)).reshape(-1, 64)
    assert torch.equal(tok.encode(x).reshape(-1), nearest_centroid(raw, tok.centroids, tok.c_sqnorm))
    for bad in (2, 0, 5, "3"):  # even, < 1, larger than the 4x4 grid, not an integer
        (out / "tokenizer.json").write_text(json.dumps({**cfg, "smooth": bad}))
        with pytest.raises(DigitError, match="smooth"):
            load_tokenizer(out)


@pytest.mark.parametrize("value", ["2", "0", "-1", "x"])
def test_cli_refuses_bad_smooth_values_in_one_line(images, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(tiny_fit_argv(images, tmp_path / "tok", 4, "--smooth", value))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "odd integer >= 1" in err[-1] and "Traceback" not in "".join(err)


def test_cli_refuses_smooth_larger_than_grid(images, tmp_path, capsys):
    rc = main(tiny_fit_argv(images, tmp_path / "tok", 4, "--smooth", "5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "smooth 5 is larger than the 4x4 token grid" in err[0]
    assert not (tmp_path / "tok" / "tokenizer.json").exists()


def test_stability_on_a_smoothed_tokenizer(images, tmp_path, capsys):
    enc = tiny_encoder(seed=3)
    c = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    tok = DiscriminativeTokenizer(enc, c, smooth=3)
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g) for _ in range(2)]
    r = token_stability(tok, batches, [math.inf, 10, -10], seed=0, progress=False)
    assert r["token_change_rate"][0] == 0.0 and r["token_change_rate"][2] >= r["token_change_rate"][1]
    tok.save(tmp_path / "tok")
    out = tmp_path / "stab.json"
    argv = ["stability", "--tokenizer", str(tmp_path / "tok"), "--data", str(images), "--snr", "30", "10",
            "--limit", "5", "--workers", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["n_images"] == 5 and 0 <= r["token_change_rate"][0] <= r["token_change_rate"][1] <= 1

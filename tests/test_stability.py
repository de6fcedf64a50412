"""Token stability under pixel noise: exact at infinite SNR, monotone as SNR falls, CLI JSON contract."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY_IMAGE_SIZE, TINY_VIT, TINY_VIT_KWARGS, write_image_folder
from digit.cli import main
from digit.evaluation.stability import noise_sigma, token_stability
from digit.tokenizers.discriminative import DiscriminativeTokenizer
from digit.tokenizers.encoder import build_encoder
from digit.tokenizers.kmeans import fit_kmeans

pytestmark = pytest.mark.filterwarnings("ignore:RANDOM-INIT")


def test_noise_sigma_hits_the_requested_snr():
    x = torch.randn(3, 3, 8, 8) * torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1, 1)
    for snr in (30.0, 10.0, 0.0):
        sigma = noise_sigma(x, snr).flatten()
        measured = 10 * torch.log10(x.pow(2).flatten(1).mean(1) / sigma**2)
        torch.testing.assert_close(measured, torch.full((3,), snr), rtol=0, atol=1e-4)
    assert noise_sigma(x, math.inf).abs().sum() == 0


@pytest.fixture(scope="module")
def tokenizer():
    enc = build_encoder(TINY_VIT, TINY_VIT_KWARGS, random_init=True, image_size=TINY_IMAGE_SIZE, layer=1, seed=3)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(32, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)
    feats = enc(enc.normalize(imgs)).reshape(-1, 64).numpy()
    return DiscriminativeTokenizer(enc, fit_kmeans(feats, 16, niter=10, seed=0))


def test_stability_exact_at_infinite_snr_and_monotone(tokenizer):
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(8, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g) for _ in range(3)]
    snrs = [math.inf, 30, 20, 10, 5, 0, -10]
    r = token_stability(tokenizer, batches, snrs, seed=0, progress=False)
    assert r["n_images"] == 24 and r["snr_db"] == [float(s) for s in snrs]
    assert r["token_change_rate"][0] == 0.0 and r["cosine_similarity"][0] == pytest.approx(1.0, abs=1e-6)
    change, cos = np.array(r["token_change_rate"]), np.array(r["cosine_similarity"])
    assert np.all(np.diff(change) >= 0) and np.all(np.diff(cos) <= 1e-9)
    assert change[-1] > 0.3 and cos[-1] < cos[1]
    again = token_stability(tokenizer, batches, snrs, seed=0, progress=False)
    assert again == r  # same seed, same numbers


class _AffineStub:
    """A tokenizer whose normalisation is ``a * u + b`` and which records the images it is asked to encode, mapped back
    to pixels; ids: a threshold of the first channel, so every noisy image is looked at."""

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b, self.seen = a, b, []

    def normalize(self, images):
        u = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return self.a * u + self.b

    def encode_normalized(self, x):
        self.seen.append((x - self.b) / self.a)
        return (x[:, 0] > self.b + 0.5 * self.a).long()

    def embed(self, ids):
        return torch.nn.functional.one_hot(ids, 2).float()


def test_pixel_noise_space_gives_every_tokenizer_the_same_noisy_images():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 256, (4, 3, 6, 6), generator=g, dtype=torch.uint8) for _ in range(2)]
    vq_like, imagenet_like = _AffineStub(2.0, -1.0), _AffineStub(1 / 0.226, -0.449 / 0.226)
    for tok in (vq_like, imagenet_like):
        r = token_stability(tok, batches, [20.0], seed=5, progress=False, noise_space="pixel")
        assert r["noise_space"] == "pixel" and r["n_images"] == 8
    # per batch: the clean image, then the noisy one; identical pixels for both tokenizers
    for clean_or_noisy_a, clean_or_noisy_b in zip(vq_like.seen, imagenet_like.seen):
        torch.testing.assert_close(clean_or_noisy_a, clean_or_noisy_b, rtol=0, atol=1e-5)
    # the noisy image is u + sigma z with sigma from the [0, 1] image's power and z the seeded draw
    u = batches[0].float() / 255
    z = torch.randn(u.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    sigma = (u.pow(2).flatten(1).mean(1) / 10**2).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(vq_like.seen[1], u + sigma * z, rtol=0, atol=1e-5)
    # in the default input space, the two normalisations give different pixel noise
    vq_like.seen.clear(), imagenet_like.seen.clear()
    for tok in (vq_like, imagenet_like):
        token_stability(tok, batches, [20.0], seed=5, progress=False)
    assert not torch.allclose(vq_like.seen[1], imagenet_like.seen[1], atol=1e-3)
    with pytest.raises(ValueError, match="noise_space"):
        token_stability(vq_like, batches, [20.0], progress=False, noise_space="latent")


def test_stability_cli_writes_contract_json(tokenizer, tmp_path, capsys):
    tokenizer.save(tmp_path / "tok")
    root = write_image_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=3)
    out = tmp_path / "stab.json"
    rc = main(
        [
            "stability",
            "--tokenizer",
            str(tmp_path / "tok"),
            "--data",
            str(root),
            "--snr",
            "30",
            "10",
            "--limit",
            "5",
            "--workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["snr_db"] == [30.0, 10.0] and r["n_images"] == 5
    assert r["noise_space"] == "input"
    assert len(r["token_change_rate"]) == 2 and len(r["cosine_similarity"]) == 2
    assert 0 <= r["token_change_rate"][0] <= r["token_change_rate"][1] <= 1
    assert "change rate" in capsys.readouterr().out

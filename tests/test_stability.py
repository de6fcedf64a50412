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
    assert len(r["token_change_rate"]) == 2 and len(r["cosine_similarity"]) == 2
    assert 0 <= r["token_change_rate"][0] <= r["token_change_rate"][1] <= 1
    assert "change rate" in capsys.readouterr().out

"""`digit.tokenizers.reconstruct`: the metrics of `digit vq reconstruct`, against direct formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from digit.cli import main
from digit.data.datasets import ImageDataset, spread_indices
from digit.data.sources import open_image_source
from digit.errors import DigitError
from digit.tokenizers.reconstruct import reconstruct
from digit.tokenizers.vq import VQModel, build_vq_config


def _folder(root, n: int = 7, size: int = 40, broken: int = 1):
    rng = np.random.default_rng(3)
    (root / "a").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + 4 * i, 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    for i in range(broken):
        (root / "a" / f"broken{i}.png").write_bytes(b"not a png")
    return root


def _vq(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(build_vq_config("tiny", image_size=16, codebook_size=32)).eval()


def test_metrics_equal_direct_formulas(tmp_path):
    src = open_image_source(_folder(tmp_path / "imgs"))
    vq = _vq()
    res = reconstruct(vq, src, batch_size=3, keep=4, progress=False)
    m = res.metrics

    # direct: every decodable image through encode -> decode, PSNR = 10 log10(1 / MSE) in [0, 1], averaged over images
    ds = ImageDataset(src, 16, train=False)
    items = [ds[i][0] for i in range(len(ds))]
    good = torch.stack([x for x in items if x is not None])
    with torch.no_grad():
        ids = vq.encode(good)
        rec = vq.decode(ids).double().numpy()
    orig = good.double().numpy() / 255.0
    mse = ((orig - rec) ** 2).reshape(len(good), -1).mean(1)
    counts = np.bincount(ids.reshape(-1).numpy(), minlength=32)
    p = counts / counts.sum()
    perplexity = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))

    assert m["n_images"] == 7 and m["skipped"] == 1 and m["codebook_size"] == 32
    assert m["psnr"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), rel=1e-5)
    assert m["codes_used"] == int((counts > 0).sum()) and m["codebook_usage"] == pytest.approx(m["codes_used"] / 32)
    assert m["codebook_perplexity"] == pytest.approx(perplexity, rel=1e-5)
    assert 0 < m["ssim"] <= 1
    # the kept pairs: the first 4 images, uint8 [k, S, S, 3]; originals are the inputs (to_uint8 truncates: +-1)
    assert res.originals.shape == res.reconstructions.shape == (4, 16, 16, 3) and res.originals.dtype == np.uint8
    np.testing.assert_allclose(res.originals.astype(int), good[:4].permute(0, 2, 3, 1).numpy().astype(int), atol=1)
    np.testing.assert_allclose(res.reconstructions / 255.0, rec[:4].transpose(0, 2, 3, 1), atol=1 / 255 + 1e-6)
    grid = res.side_by_side(pairs_per_row=2)
    assert grid.dtype == np.uint8 and grid.shape[1] > 4 * 16 and grid.shape[0] > 2 * 16  # 2 pairs a row, 2 rows


def test_psnr_of_a_black_decoder_and_the_limit(tmp_path):
    """A decoder that outputs black scores 10 log10(1 / mean(x^2)) per image; ``limit`` takes that many images spread
    over the source."""
    src = open_image_source(_folder(tmp_path / "imgs", broken=0))
    vq = _vq()
    vq.decode_latents = lambda z: vq.normalize(torch.zeros(len(z), 3, 16, 16, dtype=torch.uint8))
    black = ImageDataset(src, 16, train=False)
    res = reconstruct(vq, src, limit=3, keep=2, progress=False)
    assert res.metrics["n_images"] == 3 and len(res.originals) == 2
    direct = [
        10 * np.log10(1 / max(float((black[i][0].double() / 255).pow(2).mean()), 1e-10))
        for i in spread_indices(len(black), 3)
    ]
    assert res.metrics["psnr"] == pytest.approx(float(np.mean(direct)), rel=1e-5)


def test_no_decodable_image_is_an_error(tmp_path):
    src = open_image_source(_folder(tmp_path / "imgs", n=0, broken=2))
    with pytest.raises(DigitError, match="no usable images"):
        reconstruct(_vq(), src, progress=False)


def test_cli_writes_what_the_function_returns(tmp_path, capsys):
    vq = _vq()
    vq.save(tmp_path / "vq")
    data = _folder(tmp_path / "imgs")
    assert main(["vq", "reconstruct", "--vq", str(tmp_path / "vq"), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--batch-size", "2"]) == 0  # fmt: skip
    written = json.loads((tmp_path / "o" / "metrics.json").read_text())
    direct = reconstruct(VQModel.load(tmp_path / "vq"), open_image_source(data), batch_size=2, progress=False).metrics
    assert {k: written[k] for k in direct} == pytest.approx(direct)
    assert f"PSNR {direct['psnr']:.2f} dB" in capsys.readouterr().out

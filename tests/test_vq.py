"""The VQGAN family: layouts and key names of the originals, quantizer numerics, the tokenizer protocol, training."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from digit.cli import main
from digit.errors import DigitError
from digit.tokenizers import load_tokenizer
from digit.tokenizers.protocol import DecodingTokenizer
from digit.tokenizers.vq import PRESETS, VQConfig, VQModel, build_vq_config, entropy_loss
from digit.tokenizers.vq_train import (
    LPIPS,
    NLayerDiscriminator,
    VQLossConfig,
    VQTask,
    codebook_stats,
    hinge_d_loss,
    hinge_g_loss,
    lpips_or_warn,
    psnr,
    ssim,
)

# CPU-sized members of each family (same switches as the presets, fewer channels)
SMALL = {"ch": 32, "ch_mult": (1, 1, 2), "z_channels": 32, "image_size": 16, "codebook_size": 64}
FAMILIES = {
    "taming-f16": {**SMALL, "codebook_dim": 32},
    "mage": {**SMALL, "codebook_dim": 32},
    "llamagen-vq16": {**SMALL, "codebook_used_size": 128},
    "tiny": {},
}


def full_size(preset: str) -> VQModel:
    with torch.device("meta"):
        return VQModel.from_preset(preset)


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, S, S]: a flat background and one flat rectangle per image (no noise: exactly reconstructible)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        out[i] = rng.integers(0, 256, 3)
        y, x = rng.integers(0, size // 2, 2)
        out[i, y : y + size // 2, x : x + size // 2] = rng.integers(0, 256, 3)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------ architecture


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_family_round_trips_shapes(preset: str) -> None:
    torch.manual_seed(0)
    vq = VQModel.from_preset(preset, **FAMILIES[preset]).eval()
    s, (gh, gw) = vq.image_size, vq.grid_size
    x = images(2, s)
    ids = vq.encode(x)
    assert ids.shape == (2, gh, gw) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < vq.vocab_size
    out = vq.decode(ids)
    assert out.shape == (2, 3, s, s) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    emb = vq.embed(ids)
    assert emb.shape == (2, gh, gw, vq.cfg.codebook_dim)
    torch.testing.assert_close(emb, vq.quantize.codebook()[ids])
    recon, q = vq(vq.normalize(x))
    assert recon.shape == (2, 3, s, s) and torch.equal(q.ids, ids)
    assert isinstance(vq, DecodingTokenizer)


def test_mage_keys_follow_the_original() -> None:
    sd = shapes(full_size("mage"))
    assert len(sd) == 168
    assert sum(int(np.prod(v)) for v in sd.values()) == 54_515_587
    assert sd["quantize.embedding.weight"] == (1024, 256)
    assert sd["encoder.conv_in.weight"] == (128, 3, 3, 3) and "encoder.conv_in.bias" not in sd
    assert sd["encoder.conv_out.weight"] == (256, 512, 1, 1) and "encoder.conv_out.bias" in sd
    assert sd["decoder.conv_in.weight"] == (512, 256, 3, 3)
    # shortcut on the residual branch: [out, out]
    nin = sorted(k for k in sd if "nin_shortcut" in k)
    assert nin == [
        "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.up.3.block.0.nin_shortcut.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.down.4.block.0.nin_shortcut.weight",
    ]
    assert sd["encoder.down.2.block.0.nin_shortcut.weight"] == (256, 256, 1, 1)
    assert sd["decoder.up.3.block.0.nin_shortcut.weight"] == (256, 256, 1, 1)
    # bias-free res-block convs, two blocks per level everywhere, no attention, no quant convs, avg-pool down
    assert not any(k.endswith(("conv1.bias", "conv2.bias")) for k in sd)
    for lvl in range(5):
        assert f"decoder.up.{lvl}.block.1.conv1.weight" in sd and f"decoder.up.{lvl}.block.2.conv1.weight" not in sd
        assert f"encoder.down.{lvl}.block.1.conv2.weight" in sd
    assert [k for k in sd if "attn" in k or "quant_conv" in k or "downsample" in k] == []
    assert sorted({k.split(".upsample")[0] for k in sd if "upsample" in k}) == [f"decoder.up.{i}" for i in (1, 2, 3, 4)]
    assert {
        "encoder.mid.block_1.conv1.weight",
        "encoder.mid.block_2.conv2.weight",
        "decoder.mid.block_1.norm1.weight",
    } <= set(sd)


def test_llamagen_keys_follow_the_original() -> None:
    sd = shapes(full_size("llamagen-vq16"))
    assert len(sd) == 344
    assert sum(int(np.prod(v)) for k, v in sd.items() if k != "quantize.codebook_used") == 71_883_403
    assert sd["quantize.embedding.weight"] == (16384, 8)
    assert sd["quantize.codebook_used"] == (65536,)
    assert sd["quant_conv.weight"] == (8, 256, 1, 1) and sd["post_quant_conv.weight"] == (256, 8, 1, 1)
    assert sd["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert {f"encoder.conv_blocks.{i}.downsample.conv.weight" for i in range(4)} <= set(sd)
    assert {f"decoder.conv_blocks.{i}.upsample.conv.weight" for i in range(4)} <= set(sd)
    assert {k.split(".attn")[0] + ".attn" for k in sd if ".attn." in k} == {
        "encoder.conv_blocks.4.attn", "decoder.conv_blocks.0.attn"}  # fmt: skip
    assert "decoder.conv_blocks.0.attn.2.proj_out.weight" in sd and "encoder.conv_blocks.4.attn.1.q.weight" in sd
    assert {"encoder.mid.1.q.weight", "decoder.mid.0.conv1.weight", "decoder.mid.2.conv2.bias"} <= set(sd)
    # decoding order: conv_blocks.0 is the lowest resolution (512 channels), 3 res blocks per level
    assert sd["decoder.conv_blocks.0.res.2.conv1.weight"] == (512, 512, 3, 3)
    assert sd["decoder.conv_blocks.4.res.0.conv1.weight"] == (128, 128, 3, 3)
    assert sd["encoder.conv_blocks.2.res.0.nin_shortcut.weight"] == (256, 128, 1, 1)


def test_taming_keys_follow_the_original() -> None:
    sd = shapes(full_size("taming-f16"))
    assert len(sd) == 343
    assert sum(int(np.prod(v)) for v in sd.values()) == 72_141_699
    assert sd["quant_conv.weight"] == (256, 256, 1, 1) and sd["quantize.embedding.weight"] == (1024, 256)
    assert {k.split(".attn")[0] for k in sd if ".attn." in k} == {"encoder.down.4", "decoder.up.4"}
    assert "encoder.mid.attn_1.proj_out.weight" in sd and "decoder.mid.attn_1.k.bias" in sd
    assert "decoder.up.0.block.2.conv2.bias" in sd and "encoder.down.0.downsample.conv.weight" in sd
    assert sd["encoder.down.2.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)


def test_mage_is_unit_range_and_taming_symmetric() -> None:
    x = images(2, 16)
    mage = VQModel.from_preset("mage", **FAMILIES["mage"])
    taming = VQModel.from_preset("taming-f16", **FAMILIES["taming-f16"])
    torch.testing.assert_close(mage.normalize(x), x.float() / 255)
    torch.testing.assert_close(taming.normalize(x), x.float() / 255 * 2 - 1)
    z = torch.linspace(-1, 1, 5).view(1, 1, 1, 5)
    torch.testing.assert_close(taming.to_unit(z), (z + 1) / 2)
    torch.testing.assert_close(mage.to_unit(z), z.clamp(0, 1))


def test_mage_shortcut_applies_to_the_residual_branch() -> None:
    from digit.tokenizers.vq_blocks import ResnetBlock

    torch.manual_seed(0)
    blk = ResnetBlock(8, 16, groups=4, bias=False, shortcut_on_residual=True)
    x = torch.randn(2, 8, 4, 4)
    h = blk.conv2(F.silu(blk.norm2(blk.conv1(F.silu(blk.norm1(x))))))
    torch.testing.assert_close(blk(x), blk.nin_shortcut(h) + h)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(DigitError, match="codebook_dim"):
        VQConfig(quant_conv=False, codebook_dim=8, z_channels=256)
    with pytest.raises(DigitError, match="multiple of"):
        build_vq_config("tiny", image_size=30)
    with pytest.raises(DigitError, match="unknown VQ preset"):
        build_vq_config("nope")
    assert set(PRESETS) == {"tiny", "llamagen-vq16", "mage", "taming-f16"}


# ------------------------------------------------------------------------------------------------ quantizer


def quantizer(l2: bool, k: int = 32, d: int = 4):
    from digit.tokenizers.vq import VectorQuantizer

    torch.manual_seed(1)
    q = VectorQuantizer(
        VQConfig(
            codebook_size=k,
            codebook_dim=d,
            l2_norm=l2,
            codebook_used_size=0,
            image_size=16,
            ch_mult=(1,),
            norm_groups=1,
        )
    )
    torch.nn.init.normal_(q.embedding.weight)  # spread codes so argmins are well separated
    return q


def test_l2_lookup_is_cosine_argmax() -> None:
    q = quantizer(l2=True)
    z = torch.randn(3, 4, 5, 5)
    out = q(z)
    zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    cos = zf @ F.normalize(q.embedding.weight, dim=-1).t()
    assert torch.equal(out.ids.reshape(-1), cos.argmax(1))
    torch.testing.assert_close(
        out.z_q.permute(0, 2, 3, 1).reshape(-1, 4), F.normalize(q.embedding.weight, dim=-1)[cos.argmax(1)]
    )


def test_plain_lookup_is_nearest_neighbour() -> None:
    q = quantizer(l2=False)
    z = torch.randn(2, 4, 3, 3)
    out = q(z)
    zf = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(out.ids.reshape(-1), torch.cdist(zf, q.embedding.weight).argmin(1))


def test_losses_match_formulas_and_route_gradients() -> None:
    q = quantizer(l2=False)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    zf = z.permute(0, 2, 3, 1).reshape(-1, 4)
    e = q.embedding.weight[out.ids.reshape(-1)]
    ref = ((e - zf) ** 2).mean()
    torch.testing.assert_close(out.codebook_loss, ref)
    torch.testing.assert_close(out.commit_loss, 0.25 * ref)
    # codebook loss moves only the codes, commitment only the encoder output
    (g_code,) = torch.autograd.grad(out.codebook_loss, [z], retain_graph=True, allow_unused=True)
    assert g_code is None or torch.count_nonzero(g_code) == 0
    g_emb = torch.autograd.grad(out.codebook_loss, [q.embedding.weight], retain_graph=True)[0]
    assert torch.count_nonzero(g_emb) > 0
    g_z = torch.autograd.grad(out.commit_loss, [z], retain_graph=True)[0]
    torch.testing.assert_close(g_z.permute(0, 2, 3, 1).reshape(-1, 4), 0.25 * 2 * (zf - e).detach() / zf.numel())
    g_emb2 = torch.autograd.grad(out.commit_loss, [q.embedding.weight], allow_unused=True)[0]
    assert g_emb2 is None or torch.count_nonzero(g_emb2) == 0


def test_straight_through_passes_gradients() -> None:
    q = quantizer(l2=False)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = torch.randn(2, 4, 3, 3)
    out = q(z)
    torch.testing.assert_close(out.z_q, q.embedding.weight[out.ids].permute(0, 3, 1, 2))  # forward = the codes
    (out.z_q * w).sum().backward()
    torch.testing.assert_close(z.grad, w)  # backward = identity
    # through the l2 normalisation the gradient is that of F.normalize
    q2 = quantizer(l2=True)
    z2 = torch.randn(1, 4, 2, 2, requires_grad=True)
    (q2(z2).z_q * w[:1, :, :2, :2]).sum().backward()
    z3 = z2.detach().clone().requires_grad_(True)
    (F.normalize(z3, dim=1) * w[:1, :, :2, :2]).sum().backward()
    torch.testing.assert_close(z2.grad, z3.grad)


def test_entropy_loss_formula() -> None:
    torch.manual_seed(0)
    aff = torch.randn(10, 6)
    p = F.softmax(aff / 0.01, -1)
    avg = p.mean(0)
    ref = -(p * F.log_softmax(aff / 0.01 + 1e-5, -1)).sum(-1).mean() + (avg * torch.log(avg + 1e-5)).sum()
    torch.testing.assert_close(entropy_loss(aff), ref)
    q = VQModel.from_preset("tiny", entropy_loss_ratio=0.5).quantize
    assert float(q(torch.randn(2, 8, 2, 2)).entropy_loss.detach()) != 0.0
    z = torch.randn(2, 8, 2, 2)
    train_ids = q(z).ids
    q.eval()  # encoding needs no loss: the [N, K] softmaxes are skipped, the ids are the same
    out = q(z)
    assert float(out.entropy_loss) == 0.0 and torch.equal(out.ids, train_ids)


def test_codebook_stats_and_image_metrics() -> None:
    s = codebook_stats(torch.tensor([0, 0, 1, 1]), 8)
    assert s["perplexity"] == pytest.approx(2.0) and s["usage"] == pytest.approx(0.25)
    a = torch.rand(2, 3, 16, 16)
    b = (a + 0.1).clamp(0, 1)
    torch.testing.assert_close(psnr(a, b), 10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1)))
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    assert float(ssim(a, torch.rand(2, 3, 16, 16)).max()) < 0.5


# ------------------------------------------------------------------------------------------------ tokenizer directory


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    vq = VQModel.from_preset("tiny").eval()
    vq.save(tmp_path / "vq")
    meta = json.loads((tmp_path / "vq" / "tokenizer.json").read_text())
    assert meta["type"] == "vq" and meta["grid"] == [8, 8] and meta["vocab_size"] == 256
    loaded = load_tokenizer(tmp_path / "vq")
    assert isinstance(loaded, VQModel) and loaded.config() == vq.config()
    x = images(2, 32)
    assert torch.equal(loaded.encode(x), vq.encode(x))
    ids = vq.encode(x)
    torch.testing.assert_close(loaded.decode(ids), vq.decode(ids))
    torch.testing.assert_close(vq.encode(x), vq.encode_normalized(vq.normalize(x)))
    other = VQModel.from_preset("tiny")
    assert other.codebook_fingerprint() != vq.codebook_fingerprint()
    with pytest.raises(DigitError, match="expects ids"):
        vq.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(DigitError, match="outside"):
        vq.decode(torch.full((1, 8, 8), 256))
    meta["model"]["codebook_size"] = 128  # tokenizer.json no longer describes the stored weights
    meta["vocab_size"] = 128  # (left at 256, the file would contradict itself: refused before the weights are read)
    (tmp_path / "vq" / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(DigitError, match="do not fit the config"):
        VQModel.load(tmp_path / "vq")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps({"type": "discriminative"}))
    with pytest.raises(DigitError, match="not a VQ tokenizer"):
        VQModel.load(tmp_path / "bad")


# ------------------------------------------------------------------------------------------------ training pieces


def test_discriminator_and_hinge() -> None:
    d = NLayerDiscriminator(ndf=8, n_layers=3)
    assert [k for k in d.state_dict() if k.endswith("weight")][:3] == [
        "main.0.weight",
        "main.2.weight",
        "main.3.weight",
    ]
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    r, f = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(r, f)) == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    assert float(hinge_g_loss(f)) == pytest.approx(1.0)


def test_lpips_from_local_file_only(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = LPIPS()
    for i in range(5):
        torch.nn.init.uniform_(getattr(ref, f"lin{i}").model[1].weight, 0, 1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "lpips.safetensors"))
    m = LPIPS.from_file(tmp_path / "lpips.safetensors")
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(m(a, a), torch.zeros(2))
    assert (m(a, b) > 0).all()
    torch.testing.assert_close(m(a, b), ref(a, b))
    save_file({"features.0.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DigitError, match="not VGG16"):
        LPIPS.from_file(tmp_path / "bad.safetensors")
    with pytest.warns(UserWarning, match="LPIPS perceptual loss is off"):
        assert lpips_or_warn(None) is None


class _Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], 0, i, None  # the data layer's item: (uint8 image, label, index, error)


@pytest.mark.converge
def test_tiny_vq_overfits_through_the_trainer(tmp_path) -> None:
    from digit.training.trainer import TrainConfig, Trainer

    x = images(16, 16, seed=3)
    torch.manual_seed(0)
    vq = VQModel.from_preset("tiny", image_size=16, ch_mult=(1, 2), z_channels=16, codebook_size=64)
    with torch.no_grad():
        before = float(psnr(vq.to_unit(vq(vq.normalize(x))[0]), x.float() / 255).mean())
    steps = 100
    loss = VQLossConfig(lr=1e-3, disc_start=steps - 4, disc_weight=0.05, disc_ndf=8, disc_layers=2)
    task = VQTask(vq, _Images(x), loss, eval_images=x)
    last = Trainer(
        task, TrainConfig(steps=steps, batch_size=16, progress=False, eval_every=steps), tmp_path / "run"
    ).fit()
    assert last["val_psnr"] > 18.0 and last["val_psnr"] > before + 6.0, (before, last["val_psnr"])
    assert "discriminator_d_loss" in last and "generator_g_loss" in last  # the GAN phase ran at the end
    assert last["generator_perplexity"] > 1.0
    # the run directory is a tokenizer directory holding the trained weights
    loaded = VQModel.load(tmp_path / "run")
    rec = loaded.decode(loaded.encode(x))
    assert float(psnr(rec, x.float() / 255).mean()) == pytest.approx(last["val_psnr"], abs=0.5)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["task"] == "vqgan" and cfg["model"]["image_size"] == 16


def test_cli_train_and_reconstruct(tmp_path, capsys) -> None:
    data = tmp_path / "imgs" / "a"
    data.mkdir(parents=True)
    for i, img in enumerate(images(8, 40, seed=1)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(data / f"{i}.png")
    (data / "broken.png").write_bytes(b"not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["vq", "train", "--data", str(tmp_path / "imgs"), "--preset", "tiny", "--steps", "2",
                     "--batch-size", "4", "--disc-start", "1", "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    assert (tmp_path / "run" / "tokenizer.json").is_file() and (tmp_path / "run" / "train_state.pt").is_file()
    capsys.readouterr()
    assert main(["vq", "reconstruct", "--vq", str(tmp_path / "run"), "--data", str(tmp_path / "imgs"),
                 "--limit", "6", "--out", str(tmp_path / "rec")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "SSIM" in printed and "codebook usage" in printed
    m = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert m["n_images"] == 6 and m["codebook_size"] == 256 and 0 < m["codes_used"] <= 256
    assert {"psnr", "ssim", "codebook_perplexity", "codebook_usage"} <= set(m)
    grid = np.asarray(Image.open(tmp_path / "rec" / "grid.png"))
    assert grid.shape[1] > 2 * 32 * 4  # 4 original | reconstruction pairs per row
    assert main(["vq", "train", "--data", str(tmp_path / "imgs"), "--steps", "1", "--out", str(tmp_path / "x"),
                 "--preset", "tiny", "--image-size", "30"]) == 2  # fmt: skip
    # the run directory works as a tokenizer for `digit tokenize` (the LlamaGen path: a GPT trains on these tokens)
    assert main(["tokenize", "--tokenizer", str(tmp_path / "run"), "--data", str(tmp_path / "imgs"), "--workers", "0",
                 "--out", str(tmp_path / "tok")]) == 0  # fmt: skip
    from digit.data.tokens import read_token_dir

    tok = read_token_dir(tmp_path / "tok")
    assert tok.tokens.shape == (8, 8, 8) and tok.vocab_size == 256 and tok.meta["tokenizer"]["type"] == "vq"
    vq = VQModel.load(tmp_path / "run")
    from digit.data.datasets import ImageDataset
    from digit.data.sources import open_image_source

    first = ImageDataset(open_image_source(tmp_path / "imgs"), 32)[0][0]
    assert np.array_equal(tok.tokens[0], vq.encode(first[None])[0].numpy())


def test_cli_resume_is_exact(tmp_path) -> None:
    from safetensors.torch import load_file

    data = tmp_path / "imgs"
    data.mkdir()
    for i, img in enumerate(images(8, 36, seed=2)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(data / f"{i}.png")
    base = ["vq", "train", "--data", str(data), "--preset", "tiny", "--image-size", "16", "--batch-size", "4",
            "--disc-start", "1", "--lr", "1e-3", "--ema", "0.9"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*base, "--steps", "4", "--out", str(tmp_path / "a")]) == 0
        assert main([*base, "--steps", "2", "--out", str(tmp_path / "b")]) == 0
        assert main([*base, "--steps", "4", "--resume", "--out", str(tmp_path / "b")]) == 0
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ta = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    assert ta == json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    # the exported weights are the EMA ones, and tokenizer.json fingerprints exactly those
    assert VQModel.load(tmp_path / "a").codebook_fingerprint() == ta["codebook_fingerprint"]


@pytest.mark.dist
def test_ddp_under_torchrun_matches_one_process(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = tmp_path / "imgs"
    data.mkdir()
    for i, img in enumerate(images(8, 32, seed=4)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(data / f"{i}.png")
    # no discriminator: its BatchNorm statistics are per rank by design (as in taming / LlamaGen under DDP)
    args = ["vq", "train", "--data", str(data), "--preset", "tiny", "--image-size", "16", "--steps", "2",
            "--batch-size", "8", "--disc-weight", "0", "--lr", "1e-3"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "digit",
           *args, "--parallel", "ddp", "--out", str(tmp_path / "ddp")]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    one, ddp = (
        load_file(str(tmp_path / "one" / "model.safetensors")),
        load_file(str(tmp_path / "ddp" / "model.safetensors")),
    )
    assert one.keys() == ddp.keys()
    for k in one:
        if not k.endswith("codebook_used"):  # LlamaGen's rolling id buffer holds each rank's own recent ids
            torch.testing.assert_close(one[k], ddp[k], atol=1e-5, rtol=1e-4)

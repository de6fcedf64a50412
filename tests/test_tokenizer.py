"""Discriminative tokenizer: layer semantics, DINOv2 checkpoint layout, nearest centroid, K-means, CLI, determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_IMAGE_SIZE, TINY_VIT, TINY_VIT_KWARGS, tar_folder, tiny_fit_argv, write_image_folder
from digit.cli import main
from digit.data.tokens import read_token_dir
from digit.errors import DigitError
from digit.tokenizers import load_tokenizer
from digit.tokenizers.discriminative import DiscriminativeTokenizer, nearest_centroid
from digit.tokenizers.encoder import build_encoder, load_encoder_dir, save_encoder_dir
from digit.tokenizers.kmeans import FeatureReservoir

pytestmark = pytest.mark.filterwarnings("ignore:RANDOM-INIT")


def tiny_encoder(depth=3, layer=1, seed=0):
    kw = dict(TINY_VIT_KWARGS, depth=depth)
    return build_encoder(TINY_VIT, kw, random_init=True, image_size=TINY_IMAGE_SIZE, layer=layer, seed=seed)


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_layer_semantics_match_manual_forward_and_stop_early(layer):
    enc = tiny_encoder(depth=3, layer=layer)
    m = enc.model
    x = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
    for blk in m.blocks[: 3 - layer + 1]:  # output of block L - N (0-indexed)
        h = blk(h)
    expected = m.norm(h)[:, m.num_prefix_tokens :]  # final norm, cls + 4 registers dropped
    calls = []
    hooks = [b.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, b in enumerate(m.blocks)]
    got = enc(x)
    for hk in hooks:
        hk.remove()
    assert got.shape == (2, 16, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls == list(range(3 - layer + 1)), "forward must stop at the block it needs"


def _to_original_dinov2(timm_sd: dict, seed: int = 0) -> dict:
    """The facebookresearch/dinov2 torch-hub key layout (block_chunks=0) for the same network."""
    g = torch.Generator().manual_seed(seed)
    d = timm_sd["cls_token"].shape[-1]
    pos_cls = torch.randn(1, 1, d, generator=g)
    sd = {k: v.clone() for k, v in timm_sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    sd["cls_token"] = timm_sd["cls_token"] - pos_cls  # DINOv2 adds pos_embed[:, 0] to the cls token
    sd["pos_embed"] = torch.cat([pos_cls, timm_sd["pos_embed"]], dim=1)
    sd["register_tokens"] = timm_sd["reg_token"].clone()
    sd["mask_token"] = torch.randn(1, d, generator=g)
    return sd


def _dinov2_reference_forward(sd: dict, x: torch.Tensor, n_heads: int, upto_block: int) -> torch.Tensor:
    """DINOv2's forward written out from the original tensors: patchify, cls + pos, registers after pos, blocks, norm."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], dim=1) + sd["pos_embed"]
    t = torch.cat([t[:, :1], sd["register_tokens"].expand(len(x), -1, -1), t[:, 1:]], dim=1)
    for i in range(upto_block + 1):
        b = f"blocks.{i}."
        y = F.layer_norm(t, t.shape[-1:], sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.view(len(x), t.shape[1], 3, n_heads, -1).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        a = F.linear(a.transpose(1, 2).reshape_as(t), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        t = t + sd[b + "ls1.gamma"] * a
        y = F.layer_norm(t, t.shape[-1:], sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        y = F.linear(
            F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
            sd[b + "mlp.fc2.weight"],
            sd[b + "mlp.fc2.bias"],
        )
        t = t + sd[b + "ls2.gamma"] * y
    t = F.layer_norm(t, t.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, 5:]


def test_original_dinov2_checkpoint_loads_into_timm(tmp_path):
    src = tiny_encoder(depth=3, layer=2, seed=7)
    with torch.no_grad():  # non-trivial layer scale so a lost gamma would show
        for blk in src.model.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)
            blk.ls2.gamma.uniform_(0.5, 1.5)
    original = _to_original_dinov2(src.model.state_dict())
    path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(original, path)
    enc = build_encoder(TINY_VIT, dict(TINY_VIT_KWARGS, depth=3), weights=path, image_size=TINY_IMAGE_SIZE, layer=2)
    assert enc.source["weights"]["kind"] == "file" and len(enc.source["weights"]["sha256"]) == 64
    x = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    ref = _dinov2_reference_forward(original, enc.normalize(x), n_heads=2, upto_block=1)
    torch.testing.assert_close(enc(enc.normalize(x)), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(enc(enc.normalize(x)), src(src.normalize(x)), rtol=1e-5, atol=1e-5)


def test_missing_weights_and_bad_names_are_clear_errors(tmp_path):
    with pytest.raises(DigitError, match="--encoder-weights FILE"):
        build_encoder(TINY_VIT, TINY_VIT_KWARGS)
    with pytest.raises(DigitError, match="unknown timm model"):
        build_encoder("no_such_vit", {}, random_init=True)
    with pytest.raises(DigitError, match="not found"):
        build_encoder(TINY_VIT, TINY_VIT_KWARGS, weights=tmp_path / "missing.pth")
    bad = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "fn": print}, bad)  # a pickle that names a callable
    with pytest.raises(DigitError, match="refusing to load"):
        build_encoder(TINY_VIT, TINY_VIT_KWARGS, weights=bad)
    with pytest.raises(DigitError, match="outside 1..2"):
        build_encoder(TINY_VIT, TINY_VIT_KWARGS, random_init=True, layer=3)


def test_encoder_dir_round_trip(tmp_path):
    enc = tiny_encoder(depth=2, layer=1)
    save_encoder_dir(enc, tmp_path / "enc", name=TINY_VIT, kwargs=dict(TINY_VIT_KWARGS), image_size=TINY_IMAGE_SIZE)
    back = load_encoder_dir(tmp_path / "enc", layer=1)
    x = torch.rand(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    torch.testing.assert_close(back(back.normalize(x)), enc(enc.normalize(x)))
    assert build_encoder(str(tmp_path / "enc"), layer=1).image_size == TINY_IMAGE_SIZE


def test_nearest_centroid_equals_bruteforce_argmin():
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(1000, 16)).astype(np.float32), rng.normal(size=(37, 16)).astype(np.float32)
    brute = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    ct = torch.from_numpy(c)
    got = nearest_centroid(torch.from_numpy(x), ct, (ct * ct).sum(1), chunk=128)
    assert np.array_equal(got.numpy(), brute)


def test_tokenizer_encode_embed_and_codebook_dim_check(tmp_path):
    enc = tiny_encoder(depth=2, layer=1)
    c = np.random.default_rng(1).normal(size=(10, 64)).astype(np.float32)
    tok = DiscriminativeTokenizer(enc, c)
    imgs = torch.randint(0, 255, (3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), dtype=torch.uint8)
    ids = tok.encode(imgs)
    assert ids.shape == (3, 4, 4) and ids.dtype == torch.long
    feats = enc(enc.normalize(imgs)).reshape(-1, 64).numpy()
    assert np.array_equal(ids.reshape(-1).numpy(), ((feats[:, None] - c[None]) ** 2).sum(-1).argmin(1))
    e = tok.embed(ids)
    assert e.shape == (3, 4, 4, 64) and torch.equal(e[0, 1, 2], torch.from_numpy(c)[ids[0, 1, 2]])
    with pytest.raises(DigitError, match="codebook dimension 32"):
        DiscriminativeTokenizer(enc, c[:, :32])


def test_reservoir_bounded_uniform_and_deterministic():
    def run(seed):
        r = FeatureReservoir(100, 1, seed=seed)
        for s in range(0, 10_000, 250):
            r.add(np.arange(s, s + 250, dtype=np.float32)[:, None])
        return r

    r = run(0)
    assert r.seen == 10_000 and r.data.shape == (100, 1)
    assert np.array_equal(r.data, run(0).data) and not np.array_equal(r.data, run(1).data)
    assert len(np.unique(r.data)) == 100
    assert 3000 < r.data.mean() < 7000  # uniform over the stream, not the first 100 items
    small = FeatureReservoir(100, 1)
    small.add(np.ones((30, 1)))
    assert small.data.shape == (30, 1)


@pytest.fixture
def fitted(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), n_per_class=4, size=(60, 70))
    out = tmp_path / "tok"
    rc = main(tiny_fit_argv(str(root), str(out), 8, "--sample-frac", "1", "--niter", "5", "--batch-size", "5"))
    assert rc == 0
    return root, out


def test_fit_cli_writes_tokenizer_dir(fitted):
    _, out = fitted
    cfg = json.loads((out / "tokenizer.json").read_text())
    assert cfg["type"] == "discriminative" and cfg["vocab_size"] == 8 and cfg["grid"] == [4, 4] and cfg["layer"] == 1
    assert cfg["kmeans"]["n_images"] == 12 and cfg["kmeans"]["n_features_seen"] == 12 * 16
    c = np.load(out / "centroids.npy")
    assert c.shape == (8, 64) and c.dtype == np.float32
    assert (out / "encoder.safetensors").is_file()  # random weights travel with the codebook


def test_tokenize_deterministic_and_tar_equals_folder(fitted, tmp_path):
    root, tok_dir = fitted
    arc = tar_folder(root, tmp_path / "imgs.tar.gz")
    outs = []
    for i, data in enumerate([root, root, arc]):
        out = tmp_path / f"tokens{i}"
        assert (
            main(
                [
                    "tokenize",
                    "--tokenizer",
                    str(tok_dir),
                    "--data",
                    str(data),
                    "--workers",
                    str(i % 2),
                    "--batch-size",
                    "5",
                    "--flip",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        outs.append(read_token_dir(out))
    a, b, t = outs
    assert a.tokens.shape == (24, 4, 4) and a.tokens.dtype == np.uint16
    assert a.views == ["orig", "flip"] and a.n_images == 12 and a.class_names == ["a", "b", "c"]
    assert a.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [1] * 4 + [2] * 4
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.tokens, t.tokens)
    assert np.array_equal(a.labels, t.labels)
    assert a.meta["tokenizer"]["vocab_size"] == 8 and a.meta["source"]["n_skipped"] == 0
    # tokens equal a direct encode of the center crops
    tok = load_tokenizer(tok_dir)
    from digit.data.datasets import ImageDataset
    from digit.data.sources import open_image_source

    ds = ImageDataset(open_image_source(root), TINY_IMAGE_SIZE)
    imgs = torch.stack([ds[i][0] for i in range(12)])
    assert np.array_equal(tok.encode(imgs).numpy(), a.tokens[:12].astype(np.int64))
    assert np.array_equal(tok.encode(torch.flip(imgs, dims=[-1])).numpy(), a.tokens[12:].astype(np.int64))


def test_tokenize_skips_and_strict(fitted, tmp_path, capsys):
    root, tok_dir = fitted
    (root / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    assert (
        main(
            [
                "tokenize",
                "--tokenizer",
                str(tok_dir),
                "--data",
                str(root),
                "--workers",
                "0",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    td = read_token_dir(tmp_path / "t")
    assert len(td) == 12 and td.meta["source"]["n_skipped"] == 1
    assert "skipped 1 file(s): a/bad.jpg" in capsys.readouterr().out
    rc = main(
        [
            "tokenize",
            "--tokenizer",
            str(tok_dir),
            "--data",
            str(root),
            "--workers",
            "0",
            "--strict",
            "--out",
            str(tmp_path / "t2"),
        ]
    )
    assert rc == 2 and "a/bad.jpg" in capsys.readouterr().err and not (tmp_path / "t2").exists()


def test_km8k_style_codebook_loads(tmp_path):
    km = np.random.default_rng(0).normal(size=(12, 64)).astype(np.float16)  # any float .npy [K, D]
    np.save(tmp_path / "km_8k.npy", km)
    rc = main(
        [
            "tokenizer",
            "from-centroids",
            "--centroids",
            str(tmp_path / "km_8k.npy"),
            "--encoder",
            TINY_VIT,
            "--encoder-kwargs",
            json.dumps(TINY_VIT_KWARGS),
            "--random-init",
            "--image-size",
            "56",
            "--layer",
            "1",
            "--out",
            str(tmp_path / "tok"),
        ]
    )
    assert rc == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 12 and tok.centroids.dtype == torch.float32
    assert torch.equal(tok.centroids, torch.from_numpy(km.astype(np.float32)))
    np.save(tmp_path / "bad.npy", km[:, :10])
    rc = main(
        [
            "tokenizer",
            "from-centroids",
            "--centroids",
            str(tmp_path / "bad.npy"),
            "--encoder",
            TINY_VIT,
            "--encoder-kwargs",
            json.dumps(TINY_VIT_KWARGS),
            "--random-init",
            "--image-size",
            "56",
            "--out",
            str(tmp_path / "t2"),
        ]
    )
    assert rc == 2


def test_fit_refuses_k_larger_than_samples(tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs", classes=("a",), n_per_class=2)
    rc = main(tiny_fit_argv(str(root), str(tmp_path / "tok"), 100, "--sample-frac", "0.5"))
    err = capsys.readouterr().err
    assert rc == 2 and "K=100 is larger than the number of sampled features (16)" in err
    with pytest.raises(SystemExit):
        main(tiny_fit_argv(str(tmp_path / "missing"), str(tmp_path / "tok"), 4))


def test_precision_option_bf16_close_to_fp32_and_validated():
    enc = tiny_encoder(depth=2, layer=1)
    x = enc.normalize(torch.rand(4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(0)))
    exact = enc(x)
    assert enc.precision == "auto" and torch.equal(enc.set_precision("fp32")(x), exact)  # auto on CPU = fp32
    approx = enc.set_precision("bf16")(x)
    assert approx.dtype == torch.float32 and not torch.equal(approx, exact)
    assert ((approx - exact).norm() / exact.norm()).item() < 0.02
    with pytest.raises(DigitError, match="unknown precision"):
        enc.set_precision("fp8")


def test_reservoir_sample_is_independent_of_arrival_order():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(500, 3)).astype(np.float32)
    keys = rng.random(500)
    a, b = FeatureReservoir(50, 3), FeatureReservoir(50, 3)
    for s in range(0, 500, 37):
        a.add(rows[s : s + 37], keys[s : s + 37])
    perm = rng.permutation(500)
    for s in range(0, 500, 11):
        b.add(rows[perm[s : s + 11]], keys[perm[s : s + 11]])
    assert np.array_equal(a.data, b.data)
    assert np.array_equal(a.data, rows[np.argsort(keys)[:50]])  # exactly the 50 smallest keys


def test_fit_sample_does_not_depend_on_workers_or_batch(tmp_path):
    from digit.data.sources import open_image_source
    from digit.tokenizers.fit import sample_patch_features

    root = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), n_per_class=4)
    enc, src = tiny_encoder(depth=2, layer=1), open_image_source(root)
    kw = dict(sample_frac=0.5, max_points=20, seed=3, progress=False)
    a, _ = sample_patch_features(enc, src, batch_size=5, workers=0, **kw)
    b, _ = sample_patch_features(enc, src, batch_size=2, workers=2, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_encoder_weights_changed_after_build_are_refused(tmp_path):
    enc = tiny_encoder(depth=2, layer=1)
    path = tmp_path / "enc.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(path))
    built = build_encoder(TINY_VIT, TINY_VIT_KWARGS, weights=path, image_size=TINY_IMAGE_SIZE, layer=1)
    DiscriminativeTokenizer(built, np.zeros((4, 64), np.float32)).save(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").vocab_size == 4
    sd = {k: v.contiguous() + 1 for k, v in enc.model.state_dict().items()}
    save_file(sd, str(path))
    with pytest.raises(DigitError, match="changed since this tokenizer was built"):
        load_tokenizer(tmp_path / "tok")


def test_an_encoder_directory_retrained_after_the_fit_is_refused(tmp_path):
    """`digit encoder pretrain` rewrites its directory's weights at every checkpoint: a tokenizer fitted on that
    directory records their sha256 and refuses other weights; one written before the hash was recorded still loads
    and saves back unchanged."""
    enc = tiny_encoder(depth=2, layer=1)
    save_encoder_dir(enc, tmp_path / "enc", name=TINY_VIT, kwargs=dict(TINY_VIT_KWARGS), image_size=TINY_IMAGE_SIZE)
    on_dir = build_encoder(str(tmp_path / "enc"), layer=1)
    DiscriminativeTokenizer(on_dir, np.zeros((4, 64), np.float32)).save(tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    from digit.utils.io import file_sha256

    assert cfg["encoder"]["weights"]["sha256"] == file_sha256(tmp_path / "enc" / "encoder.safetensors")
    assert load_tokenizer(tmp_path / "tok").vocab_size == 4
    retrained = tiny_encoder(depth=2, layer=1, seed=9)  # what a later checkpoint writes
    save_encoder_dir(
        retrained, tmp_path / "enc", name=TINY_VIT, kwargs=dict(TINY_VIT_KWARGS), image_size=TINY_IMAGE_SIZE
    )
    with pytest.raises(DigitError, match="changed since this tokenizer was fitted"):
        load_tokenizer(tmp_path / "tok")
    del cfg["encoder"]["weights"]["sha256"]  # a tokenizer.json from before the record
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(cfg))
    old = load_tokenizer(tmp_path / "tok")
    old.save(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "tokenizer.json").read_text())["encoder"] == cfg["encoder"]


def test_default_layer_is_the_one_an_encoder_directory_names(tmp_path):
    from digit.cli.tokenizer import default_layer

    enc = tiny_encoder(depth=2, layer=1)
    kw = dict(TINY_VIT_KWARGS)
    save_encoder_dir(enc, tmp_path / "plain", name=TINY_VIT, kwargs=kw, image_size=TINY_IMAGE_SIZE)
    save_encoder_dir(
        enc, tmp_path / "student", name=TINY_VIT, kwargs=kw, image_size=TINY_IMAGE_SIZE, extra={"layer": 1}
    )
    assert default_layer(str(tmp_path / "plain")) == 3 and default_layer(str(tmp_path / "student")) == 1
    assert default_layer("tf_efficientnet_lite0") == "stride16" and default_layer(TINY_VIT) == 3

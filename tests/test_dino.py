"""DINO pretraining: numerics against direct formulas, augmentation determinism, the kNN monitor, and short runs through
the shared trainer (loss goes down, exact resume, the output loads as an encoder and in `digit tokenizer fit`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from digit.errors import DigitError
from digit.ssl.augment import N_PARAMS, MultiCropAugment, MultiCropConfig, view_rng
from digit.ssl.dino import (
    DINOConfig,
    DINOCriterion,
    DINOHead,
    DINOLoss,
    DINOStudent,
    ViTBackbone,
    cosine_schedule,
    iBOTPatchLoss,
    koleo_loss,
    linear_warmup,
    sinkhorn_knopp,
)
from digit.ssl.knn import knn_accuracy, knn_predict

TINY = {"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2}
ENCODER = "vit_tiny_patch16_224"


def tiny_vit(size: int = 16):
    import timm

    torch.manual_seed(0)
    return timm.create_model(ENCODER, num_classes=0, img_size=size, **TINY)


def make_images(root: Path, n_per_class: int = 12, size: int = 16, n_classes: int = 4, seed: int = 0) -> Path:
    """ImageFolder of class-dependent coloured shapes (square / disc in a class colour) on a noisy grey background."""
    rng = np.random.default_rng(seed)
    colors = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230], [230, 210, 40]])
    for c in range(n_classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(90, 140, size=(size, size, 3)).astype(np.uint8)
            s = int(rng.integers(size // 3, size // 2 + 1))
            y, x = rng.integers(0, size - s + 1, size=2)
            yy, xx = np.mgrid[:s, :s]
            disc = (yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2 <= (s / 2) ** 2
            shape = disc if c % 2 else np.ones((s, s), bool)
            img[y : y + s, x : x + s][shape] = colors[c]
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


# ---------------------------------------------------------------- backbone, head, losses


def test_backbone_equals_timm_forward_and_runs_at_other_sizes():
    vit = tiny_vit().eval()
    bb = ViTBackbone(vit, mask_token=True)
    x = torch.randn(3, 3, 16, 16)
    cls, patches = bb(x)
    ref = vit.forward_features(x)  # [B, 1 + 16, D]
    torch.testing.assert_close(cls, ref[:, 0])
    torch.testing.assert_close(patches, ref[:, 1:])
    # an all-false mask changes nothing; a mask changes only through the mask token
    torch.testing.assert_close(bb(x, mask=torch.zeros(3, 16, dtype=torch.bool))[1], patches)
    m = torch.zeros(3, 16, dtype=torch.bool)
    m[0, 5] = True
    assert not torch.allclose(bb(x, mask=m)[1][0], patches[0])
    torch.testing.assert_close(bb(x, mask=m)[1][1:], patches[1:])
    # local crops: 8x8 input -> 2x2 grid with resampled positions
    cls8, p8 = bb(torch.randn(2, 3, 8, 8))
    assert cls8.shape == (2, 32) and p8.shape == (2, 4, 32)


def test_head_is_cosine_to_prototypes_and_freezing_zeroes_their_gradient():
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=50, hidden_dim=16, bottleneck_dim=8, nlayers=3)
    x = torch.randn(5, 32)
    out = head(x)
    z = head.mlp(x)
    ref = (z / z.norm(dim=1, keepdim=True)) @ (head.prototypes / head.prototypes.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(out, ref)
    assert out.shape == (5, 50) and out.abs().max() <= 1 + 1e-5
    head(x, freeze_prototypes=True).sum().backward()
    assert head.prototypes.grad is not None and head.prototypes.grad.abs().max() == 0
    assert head.mlp[0].weight.grad.abs().max() > 0


def test_dino_loss_matches_the_papers_pseudocode():
    torch.manual_seed(0)
    V, G, B, K = 4, 2, 3, 10
    s, t = torch.randn(V, B, K), torch.randn(G, B, K)
    loss_fn = DINOLoss(K, student_temp=0.1)
    loss_fn.center.copy_(torch.randn(1, K))
    got = loss_fn(s, t, teacher_temp=0.04)
    total, n = 0.0, 0
    for g in range(G):
        q = torch.softmax((t[g] - loss_fn.center) / 0.04, dim=-1)
        for v in range(V):
            if v == g:
                continue
            total += (-(q * torch.log_softmax(s[v] / 0.1, dim=-1)).sum(-1)).mean()
            n += 1
    torch.testing.assert_close(got, total / n)


def test_centering_tracks_the_batch_mean():
    torch.manual_seed(0)
    loss_fn = DINOLoss(6, center_momentum=0.9)
    c = torch.zeros(1, 6)
    for _ in range(3):
        t = torch.randn(8, 6) + 2.0
        loss_fn.update(t)
        c = 0.9 * c + 0.1 * t.mean(0, keepdim=True)
        torch.testing.assert_close(loss_fn.center, c)
    # a constant teacher output pulls the centre to it geometrically
    for _ in range(200):
        loss_fn.update(torch.full((4, 6), 3.0))
    torch.testing.assert_close(loss_fn.center, torch.full((1, 6), 3.0), atol=1e-5, rtol=0)
    assert "center" in loss_fn.state_dict()  # checkpointed with the module


def _sinkhorn_reference(logits: np.ndarray, temp: float, iters: int) -> np.ndarray:
    """DINOv2's teacher centring written directly: alternate normalising prototypes (to 1/K) and samples (to 1/N)."""
    q = np.exp(logits.astype(np.float64) / temp).T  # [K, N]
    k, n = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * n
    return (q * n).T


def test_sinkhorn_knopp_matches_alternating_normalisation_and_balances_the_batch():
    torch.manual_seed(0)
    logits = torch.nn.functional.normalize(torch.randn(24, 16), dim=-1) @ torch.randn(16, 10).clamp(-1, 1)
    got = sinkhorn_knopp(logits, temp=0.1, iters=3)
    np.testing.assert_allclose(got.numpy(), _sinkhorn_reference(logits.numpy(), 0.1, 3), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.sum(1), torch.ones(24))  # every sample's target is a distribution
    converged = sinkhorn_knopp(logits, temp=0.1, iters=200)
    torch.testing.assert_close(converged.sum(0), torch.full((10,), 24 / 10), rtol=1e-4, atol=1e-4)  # equipartition
    # a teacher that gives every image the same logits cannot yield one-prototype targets: they come out uniform
    same = sinkhorn_knopp(torch.randn(1, 10).expand(24, 10), temp=0.04, iters=3)
    torch.testing.assert_close(same, torch.full((24, 10), 0.1), rtol=1e-4, atol=1e-5)
    # the head's logits are cosines: at half DINO's sharpest temperature every row is still a distribution
    cosines = F.normalize(torch.randn(24, 16), dim=-1) @ F.normalize(torch.randn(10, 16), dim=-1).T
    torch.testing.assert_close(sinkhorn_knopp(cosines, temp=0.02).sum(1), torch.ones(24))
    # far sharper than that, exp underflows for whole prototypes: zeros where it did, never NaN
    sharp = sinkhorn_knopp(logits * 50, temp=0.04)
    assert torch.isfinite(sharp).all() and (sharp >= 0).all() and (sharp.sum(1) <= 1 + 1e-5).all()


def _sinkhorn_rank(rank: int, world: int, port: int, logits: torch.Tensor, split: int, out) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        part = logits[:split] if rank == 0 else logits[split:]
        out[rank] = sinkhorn_knopp(part, temp=0.1, iters=5)
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_sinkhorn_knopp_over_two_ranks_with_unequal_counts_equals_one_process():
    """iBOT's masked patches differ in number between ranks: the balance is over the union, not per rank."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    logits = torch.nn.functional.normalize(torch.randn(30, 16), dim=-1) @ torch.randn(16, 8).clamp(-1, 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_sinkhorn_rank, args=(2, port, logits, 6, out), nprocs=2, join=True)
    joined = torch.cat([out[0], out[1]])
    torch.testing.assert_close(joined, sinkhorn_knopp(logits, temp=0.1, iters=5), rtol=1e-5, atol=1e-6)


def test_dino_loss_with_sinkhorn_centering_and_its_config():
    torch.manual_seed(0)
    G, V, B, K = 2, 4, 6, 9
    s, t = torch.randn(V, B, K), torch.randn(G, B, K)
    loss_fn = DINOLoss(K, student_temp=0.1, centering="sinkhorn")
    loss_fn.center.copy_(torch.randn(1, K))  # ignored by Sinkhorn-Knopp
    got = loss_fn(s, t, teacher_temp=0.05)
    q = torch.from_numpy(_sinkhorn_reference(t.reshape(-1, K).numpy(), 0.05, 3)).float().reshape(G, B, K)
    pairs = [(g, v) for g in range(G) for v in range(V) if v != g]
    want = sum((-(q[g] * torch.log_softmax(s[v] / 0.1, dim=-1)).sum(-1)).mean() for g, v in pairs) / len(pairs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the default is left out of stored configs (runs made before the option still resume); the other is recorded
    assert "centering" not in DINOConfig().to_dict()
    d = DINOConfig(centering="sinkhorn").to_dict()
    assert d["centering"] == "sinkhorn" and DINOConfig.from_dict(d) == DINOConfig(centering="sinkhorn")
    assert DINOConfig.from_dict(DINOConfig().to_dict()).centering == "ema"
    with pytest.raises(DigitError, match="centering must be"):
        DINOConfig(centering="Sinkhorn")


def test_ibot_loss_is_a_per_image_mean_over_masked_patches():
    torch.manual_seed(0)
    K = 7
    fn = iBOTPatchLoss(K, student_temp=0.1)
    s, t = torch.randn(5, K), torch.randn(5, K)
    img = torch.tensor([0, 0, 0, 2, 2])
    got = fn(s, t, img, n_images=3, temp=0.05)
    ce = -(torch.softmax(t / 0.05, -1) * torch.log_softmax(s / 0.1, -1)).sum(-1)
    torch.testing.assert_close(got, (ce[:3].mean() + ce[3:].mean()) / 2)


def test_koleo_matches_brute_force():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    xn = x / x.norm(dim=1, keepdim=True)
    d = torch.cdist(xn, xn) + torch.eye(6) * 10
    torch.testing.assert_close(koleo_loss(x), -torch.log(d.min(1).values + 1e-8).mean(), rtol=1e-4, atol=1e-5)


def test_schedules():
    assert cosine_schedule(0, 100, 1.0, 0.1, warmup=10) == 0.0
    assert cosine_schedule(10, 100, 1.0, 0.1, warmup=10) == pytest.approx(1.0)
    assert cosine_schedule(55, 100, 1.0, 0.1, warmup=10) == pytest.approx(0.55)
    assert cosine_schedule(100, 100, 1.0, 0.1, warmup=10) == pytest.approx(0.1)
    assert cosine_schedule(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert linear_warmup(0, 30, 0.04, 0.07) == 0.04 and linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(30, 30, 0.04, 0.07) == 0.07 and linear_warmup(5, 0, 0.04, 0.07) == 0.07


def test_student_single_forward_shapes():
    cfg = DINOConfig(out_dim=40, hidden_dim=16, bottleneck_dim=8, ibot_weight=1.0)
    st = DINOStudent(tiny_vit(), cfg)
    g, loc = torch.randn(2 * 3, 3, 16, 16), torch.randn(4 * 3, 3, 8, 8)
    sel = torch.zeros(6, 16, dtype=torch.bool)
    sel[0, :4] = True
    sel[5, 7] = True
    out = st(g, loc, mask=sel, select=sel)
    assert out["cls"].shape == (6, 32) and out["logits"].shape == (18, 40) and out["patch_logits"].shape == (5, 40)


# ---------------------------------------------------------------- augmentation


def test_multicrop_is_deterministic_in_range_and_identity_params_render_the_image():
    aug = MultiCropAugment(MultiCropConfig(global_size=16, local_size=8, n_local=3))
    p1 = aug.draw(view_rng(1, 2, 3), 16, 16)
    assert p1.shape == (5, N_PARAMS)
    np.testing.assert_array_equal(p1, aug.draw(view_rng(1, 2, 3), 16, 16))
    assert not np.array_equal(p1, aug.draw(view_rng(1, 3, 3), 16, 16))  # another epoch, other views
    boxes = p1[:, :4]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 16 + 1e-4).all()
    area = boxes[:, 2] * boxes[:, 3] / 256
    assert (area[:2] >= 0.4 - 1e-4).all() and (area[2:] <= 0.4 + 1e-4).all()

    imgs = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    params = torch.from_numpy(np.stack([aug.draw(view_rng(0, 0, i), 16, 16) for i in range(2)]))
    g, loc = aug.apply(imgs, params)
    assert g.shape == (2, 2, 3, 16, 16) and loc.shape == (3, 2, 3, 8, 8)
    g2, loc2 = aug.apply(imgs, params)
    torch.testing.assert_close(g, g2)
    torch.testing.assert_close(loc, loc2)

    # identity parameters: the whole image, no flip / jitter / grey / blur / solarize -> just normalised pixels
    ident = torch.zeros(2, 5, N_PARAMS)
    ident[:, :, 2:4] = 16.0
    ident[:, :, 6:9] = 1.0
    g, _ = aug.apply(imgs, ident)
    mean, std = torch.tensor(aug.cfg.mean).view(1, 3, 1, 1), torch.tensor(aug.cfg.std).view(1, 3, 1, 1)
    torch.testing.assert_close(g[0], (imgs.float() / 255 - mean) / std, atol=1e-5, rtol=0)
    ident[:, :, 4] = 1.0  # flip
    g, _ = aug.apply(imgs, ident)
    torch.testing.assert_close(g[0], ((imgs.float() / 255 - mean) / std).flip(-1), atol=1e-5, rtol=0)
    ident[:, :, 4] = 0.0
    ident[:, :, 13] = 1.0  # solarize
    g, _ = aug.apply(imgs, ident)
    x = imgs.float() / 255
    torch.testing.assert_close(g[0], (torch.where(x >= 0.5, 1 - x, x) - mean) / std, atol=1e-5, rtol=0)


def test_batched_photometric_ops_match_torchvision():
    import torchvision.transforms.functional as TF

    from digit.ssl.augment import color_jitter, gaussian_blur

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 12, 12, generator=g)
    b, c, s = torch.tensor([0.7, 1.0, 1.3]), torch.tensor([1.2, 0.8, 1.0]), torch.tensor([0.9, 1.1, 0.0])
    got = color_jitter(x, b, c, s, torch.zeros(3))
    for i in range(3):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], b[i]), c[i]), s[i])
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=0)
    shifted = color_jitter(x, torch.ones(3), torch.ones(3), torch.ones(3), torch.tensor([0.0, 0.25, 0.5]))
    torch.testing.assert_close(shifted[0], x[0], atol=1e-5, rtol=0)  # zero hue shift is the identity
    assert (shifted[1] - x[1]).abs().max() > 0.05

    sig = torch.tensor([1.0, 0.6, 0.0])
    blurred = gaussian_blur(x, sig, max_sigma=1.0)  # radius 3: kernel 7
    for i in range(2):
        torch.testing.assert_close(blurred[i], TF.gaussian_blur(x[i], [7, 7], [float(sig[i])] * 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(blurred[2], x[2])  # sigma 0: untouched


# ---------------------------------------------------------------- kNN monitor


def test_knn_matches_brute_force_and_recovers_planted_classes():
    g = torch.Generator().manual_seed(0)
    n_cls, D = 10, 16
    means = torch.randn(n_cls, D, generator=g) * 3
    ytr, yte = torch.arange(500) % n_cls, torch.arange(200) % n_cls
    xtr = means[ytr] + torch.randn(500, D, generator=g)
    xte = means[yte] + torch.randn(200, D, generator=g)
    assert knn_accuracy(xtr, ytr, xte, yte, n_cls) > 0.95
    rtr, rte = torch.randn(500, D, generator=g), torch.randn(200, D, generator=g)
    assert knn_accuracy(rtr, ytr, rte, yte, n_cls) < 0.2  # chance is 0.1

    # brute force: cosine, top-20, votes weighted by exp(sim / 0.07)
    a, b = F.normalize(xtr, dim=1).numpy(), F.normalize(xte, dim=1).numpy()
    sim = b @ a.T
    ref = []
    for row in sim:
        top = np.argsort(-row)[:20]
        votes = np.zeros(n_cls)
        np.add.at(votes, ytr.numpy()[top], np.exp(row[top] / 0.07))
        ref.append(votes.argmax())
    np.testing.assert_array_equal(knn_predict(xtr, ytr, xte, n_cls, chunk=64).numpy(), np.array(ref))


# ---------------------------------------------------------------- runs through the shared trainer


def _task_cfg(data: Path, **over):
    from digit.ssl.task import DINOTaskConfig

    kw = dict(
        data=str(data), encoder=ENCODER, encoder_kwargs=TINY, image_size=16, local_size=8, val_fraction=0.25,
        epochs=4, batch_size=12, lr=4e-3, warmup_epochs=0.5, warmup_teacher_temp_epochs=0.0,
        crops=MultiCropConfig(n_local=2), dino=DINOConfig(out_dim=128, hidden_dim=64, bottleneck_dim=16),
    )  # fmt: skip
    kw.update(over)
    return DINOTaskConfig(**kw)


def _fit(cfg, out: Path, resume: bool = False, stop_at: int | None = None, save_every: int | None = None):
    from digit.ssl.task import DINOTask
    from digit.training.trainer import TrainConfig, Trainer

    task = DINOTask(cfg, quiet=True)
    if stop_at is not None:
        real = task.compute_loss

        def crash(batch, step, phase):
            if step == stop_at:
                raise KeyboardInterrupt
            return real(batch, step, phase)

        task.compute_loss = crash
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, save_every=save_every or task.steps_per_epoch,
                       eval_every=task.steps_per_epoch, progress=False)  # fmt: skip
    trainer = Trainer(task, tcfg, out, resume=resume)
    return task, trainer.fit()


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.converge
def test_short_run_decreases_loss_and_exports_an_encoder_directory(tmp_path):
    """The student learns the distillation target through the whole pipeline (crops -> student -> loss -> trainer).

    Teacher and centre are pinned (momentum 1, centre momentum 1) so the target is fixed: in a run this short and
    this tiny, the live EMA teacher barely moves while centring removes its common mode, which pushes the loss
    towards log K whatever the student does (the full dynamics are covered by the resume test and the formulas)."""
    from safetensors.torch import load_file

    from digit.tokenizers.encoder import load_encoder_dir

    data = make_images(tmp_path / "imgs")
    dino = DINOConfig(out_dim=128, hidden_dim=64, bottleneck_dim=64, teacher_temp=0.04, teacher_temp_final=0.04,
                      center_momentum=1.0)  # fmt: skip
    cfg = _task_cfg(data, lr=4e-2, momentum_teacher=1.0, freeze_last_layer_epochs=0, dino=dino)
    task, last = _fit(cfg, tmp_path / "run")
    rec = [r for r in _records(tmp_path / "run") if "loss" in r]
    assert len(rec) == task.total_steps == 12
    first, final = np.mean([r["loss"] for r in rec[:3]]), np.mean([r["loss"] for r in rec[-3:]])
    assert final < first - 0.3, (first, final)
    assert 0.0 <= last["knn_top1"] <= 1.0 and all(math.isfinite(r["loss"]) for r in rec)
    assert {"dino", "target_entropy", "batch_entropy", "teacher_temp", "momentum", "images_per_s"} <= set(rec[-1])

    # the run directory is an encoder directory holding the teacher's backbone
    enc = load_encoder_dir(tmp_path / "run", layer=1)
    assert enc.image_size == 16 and enc.grid_size == (4, 4) and enc.embed_dim == 32
    stored = load_file(str(tmp_path / "run" / "model.safetensors"))
    torch.testing.assert_close(enc.model.pos_embed, stored["backbone.vit.pos_embed"])
    torch.testing.assert_close(enc.model.blocks[0].attn.qkv.weight, task.teacher.backbone.vit.blocks[0].attn.qkv.weight)
    feats = enc(enc.normalize(torch.rand(2, 3, 16, 16)))
    assert feats.shape == (2, 16, 32) and torch.isfinite(feats).all()


def test_teacher_is_an_ema_of_the_student(tmp_path):
    from digit.ssl.task import DINOTask

    task = DINOTask(_task_cfg(make_images(tmp_path / "imgs", n_per_class=3), val_fraction=0.0), quiet=True)
    with torch.no_grad():
        for p in task.student.parameters():
            p.add_(torch.randn_like(p))  # a student that differs from the teacher
    assert not any(p.requires_grad for p in task.teacher.parameters())
    for step in (0, 2):
        t_old = [p.detach().clone() for p in task.teacher.parameters()]
        s_now = [p.detach().clone() for p in task.student.parameters()]
        m = task.momentum(step)
        expect = 0.996 + (1 - 0.996) * (1 - math.cos(math.pi * step / task.total_steps)) / 2  # DINO's cosine schedule
        assert m == pytest.approx(expect)
        task.after_optimizer_step(step, "main")
        for t0, s, t1 in zip(t_old, s_now, task.teacher.parameters()):
            torch.testing.assert_close(t1, m * t0 + (1 - m) * s)


def test_frozen_prototypes_get_no_gradient_so_adamw_neither_decays_nor_counts_them(tmp_path):
    """DINO's cancel_gradients_last_layer: during the freeze the prototypes' grad is None at the optimizer step, so
    AdamW skips them (no weight decay, no moment step); after it they train from a fresh Adam state."""
    cfg = _task_cfg(make_images(tmp_path / "imgs"), epochs=2, freeze_last_layer_epochs=1)
    task, _ = _fit(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    frozen_steps, total = task.steps_per_epoch, task.total_steps
    steps = {tuple(v["exp_avg"].shape): int(v["step"]) for v in state["optimizers"]["main"]["state"].values()}
    assert tuple(task.student.head.prototypes.shape) == (128, 16)  # the only [128, 16] tensor of this student
    assert steps.pop((128, 16)) == total - frozen_steps  # not counted while frozen
    assert set(steps.values()) == {total}


def test_a_cnn_teacher_keeps_its_own_batchnorm_statistics(tmp_path):
    """As in DINO, a CNN teacher normalises with batch statistics and updates its running ones (which the exported
    encoder uses), instead of keeping the statistics it started with."""
    from digit.ssl.task import DINOTask

    cfg = _task_cfg(make_images(tmp_path / "imgs", size=32), encoder="tf_efficientnet_lite0", encoder_kwargs={},
                    image_size=32, local_size=16, epochs=1,
                    dino=DINOConfig(out_dim=32, hidden_dim=16, bottleneck_dim=16))  # fmt: skip
    task = DINOTask(cfg, quiet=True)
    bn = [m for m in task.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    start = bn[0].running_var.clone()
    task.before_step(0)
    assert all(m.training for m in bn) and not task.teacher.backbone.training
    batch = task.collate([task.dataset[i] for i in range(4)])
    task.compute_loss(batch, 0, "main")
    assert not torch.equal(bn[0].running_var, start)


def test_resume_is_exact(tmp_path):
    data = make_images(tmp_path / "imgs", n_per_class=9)
    dino = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, ibot_weight=1.0, koleo_weight=0.1)
    cfg = _task_cfg(data, epochs=3, dino=dino)  # 27 training images, batch 12: 2 steps/epoch, 6 steps
    task, _ = _fit(cfg, tmp_path / "full", save_every=3)
    assert task.total_steps == 6
    with pytest.raises(KeyboardInterrupt):
        _fit(cfg, tmp_path / "cut", stop_at=5, save_every=3)  # killed at step 5; last checkpoint mid-epoch 1 (step 3)
    assert torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)["step"] == 3
    _fit(cfg, tmp_path / "cut", resume=True, save_every=3)
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    sa = torch.load(tmp_path / "full" / "train_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "cut" / "train_state.pt", weights_only=True)
    torch.testing.assert_close(sa["modules"]["criterion"]["dino.center"], sb["modules"]["criterion"]["dino.center"])
    torch.testing.assert_close(sa["modules"]["student"], sb["modules"]["student"], rtol=0, atol=0)
    la = [r for r in _records(tmp_path / "full") if "loss" in r]
    lb = [r for r in _records(tmp_path / "cut") if "loss" in r]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert sum(r.get("ibot", 0) > 0 for r in la) > 0


def test_views_rendered_in_workers_or_on_the_device_are_the_same(tmp_path):
    """The CPU path renders views in the collate (DataLoader workers), the CUDA path inside compute_loss: same loss."""
    from digit.ssl.task import DINOTask

    cfg = _task_cfg(make_images(tmp_path / "imgs", n_per_class=3), val_fraction=0.0)
    cpu, dev = DINOTask(cfg, quiet=True, render_on_device=False), DINOTask(cfg, quiet=True, render_on_device=True)
    items = [cpu.dataset[i] for i in range(6)]
    b_cpu, b_dev = cpu.collate(items), dev.collate(items)
    assert "global" in b_cpu and "images" in b_dev
    for t in (cpu, dev):
        t.before_step(0)
    torch.testing.assert_close(cpu.compute_loss(b_cpu, 0, "main")[0], dev.compute_loss(b_dev, 0, "main")[0])
    dev.dataset.set_epoch(1)
    assert not torch.equal(dev.dataset[0]["params"], items[0]["params"])  # new epoch, new views


def test_cli_pretrain_then_tokenizer_fit(tmp_path):
    from digit.cli import main

    data = make_images(tmp_path / "imgs", n_per_class=6)
    out = tmp_path / "enc"
    argv = ["encoder", "pretrain", "--data", str(data), "--encoder", ENCODER, "--encoder-kwargs", json.dumps(TINY),
            "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25", "--local-crops", "1",
            "--out-dim", "64", "--hidden-dim", "32", "--bottleneck-dim", "16", "--num-workers", "0", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert (out / "encoder.json").is_file() and (out / "train_state.pt").is_file()
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["name"] == ENCODER and meta["image_size"] == 16
    run_cfg = json.loads((out / "config.json").read_text())
    assert run_cfg["task"] == "dino" and run_cfg["dino"]["local_size"] == 8  # 16 * 96 / 224 rounded to the patch
    assert run_cfg["dino"]["freeze_last_layer_epochs"] == 0.01 and run_cfg["dino"]["crops"]["n_local"] == 1
    assert "knn_top1" in _records(out)[-1]
    assert main(argv) == 2  # the run exists: refuse without --resume
    assert main([*argv, "--resume"]) == 0  # nothing left: rewrites the artefacts
    with pytest.raises(SystemExit):
        main(["encoder", "pretrain", "--data", str(data), "--encoder", ENCODER, "--epochs", "1", "--val", str(data),
              "--val-fraction", "0.1", "--out", str(tmp_path / "x")])  # fmt: skip
    bad = ["encoder", "pretrain", "--data", str(data), "--encoder", ENCODER, "--encoder-kwargs", json.dumps(TINY),
           "--image-size", "18", "--epochs", "1", "--num-workers", "0", "--out", str(tmp_path / "y")]  # fmt: skip
    assert main(bad) == 2  # 18 is not a multiple of the patch size
    sk = tmp_path / "sk"
    sk_argv = [a if a != str(out) else str(sk) for a in argv] + ["--centering", "sinkhorn", "--koleo-weight", "0.1"]
    assert main(sk_argv) == 0
    sk_cfg = json.loads((sk / "config.json").read_text())
    assert sk_cfg["dino"]["dino"]["centering"] == "sinkhorn" and "centering" not in run_cfg["dino"]["dino"]
    assert all(math.isfinite(r["loss"]) for r in _records(sk) if "loss" in r)

    tok = tmp_path / "tok"
    fit = ["tokenizer", "fit", "--data", str(data), "--encoder", str(out), "--layer", "1", "--clusters", "4",
           "--sample-frac", "1.0", "--workers", "0", "--out", str(tok)]  # fmt: skip
    assert main(fit) == 0
    cfg = json.loads((tok / "tokenizer.json").read_text())
    assert cfg["image_size"] == 16 and np.load(tok / "centroids.npy").shape == (4, 32)


@pytest.mark.dist
def test_torchrun_ddp_matches_one_process(tmp_path):
    """Two gloo ranks (DDP on the student, teacher and centres outside it) give the single-process result. (iBOT and
    KoLeo normalise over each rank's own images, as DINOv2 does, so only the DINO loss is exactly layout-free.)"""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = make_images(tmp_path / "imgs", n_per_class=6)
    args = ["encoder", "pretrain", "--data", str(data), "--encoder", ENCODER, "--encoder-kwargs", json.dumps(TINY),
            "--image-size", "16", "--epochs", "2", "--batch-size", "8", "--val-fraction", "0.25", "--local-crops", "1",
            "--out-dim", "32", "--hidden-dim", "16", "--bottleneck-dim", "16", "--freeze-last-layer-epochs", "1",
            "--num-workers", "0", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "digit"]
    for cmd, out in ((torchrun, "ddp"), ([sys.executable, "-m", "digit"], "one")):
        extra = ["--parallel", "ddp"] if out == "ddp" else []
        r = subprocess.run([*cmd, *args, *extra, "--out", str(tmp_path / out)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (
        load_file(str(tmp_path / "ddp" / "model.safetensors")),
        load_file(str(tmp_path / "one" / "model.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    la, lb = _records(tmp_path / "ddp"), _records(tmp_path / "one")
    np.testing.assert_allclose(
        [r["loss"] for r in la if "loss" in r], [r["loss"] for r in lb if "loss" in r], rtol=1e-4
    )


def _criterion_inputs(n_masked: int, K: int = 12, B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = {"logits": torch.randn(4 * B, K, generator=g), "patch_logits": torch.randn(n_masked, K, generator=g)}
    teacher = {"logits": torch.randn(2 * B, K, generator=g), "patch_logits": torch.randn(n_masked, K, generator=g)}
    mask = torch.zeros(2 * B, 9, dtype=torch.bool)
    mask.view(-1)[:n_masked] = True  # the first n_masked patches (image 0, then image 1, ...)
    return student, teacher, mask


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_a_step_without_masked_patches_gives_zero_ibot_and_leaves_its_centre(centering):
    cfg = DINOConfig(out_dim=12, ibot_weight=1.0, koleo_weight=0.0, centering=centering)
    crit = DINOCriterion(cfg).train()
    crit.ibot.center.copy_(torch.randn(1, 12))
    before = crit.ibot.center.clone()
    student, teacher, mask = _criterion_inputs(0)
    student = {k: v.requires_grad_() for k, v in student.items()}
    out = crit(student, teacher, n_global=2, teacher_temp=0.04, mask=mask)
    assert out["ibot"].item() == 0.0 and torch.isfinite(out["loss"]) and torch.equal(out["loss"], out["dino"])
    assert torch.equal(crit.ibot.center, before)  # no batch mean to move it towards (0 / 0 would have made it NaN)
    out["loss"].backward()
    assert student["patch_logits"].grad.shape == (0, 12)  # still part of the graph: DDP sees every parameter used


def _criterion_rank(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        crit = DINOCriterion(DINOConfig(out_dim=12, ibot_weight=1.0, koleo_weight=0.0, centering="sinkhorn")).train()
        student, teacher, mask = _criterion_inputs(0 if rank == 0 else 7, seed=rank)
        res = crit(student, teacher, n_global=2, teacher_temp=0.04, mask=mask)
        out[rank] = (res["ibot"], crit.ibot.center.clone())
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_ranks_with_and_without_masked_patches_both_finish_the_step():
    """A rank that drew no masked patch used to skip iBOT's all-reduces while the others waited in them forever."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    ctx = mp.spawn(_criterion_rank, args=(2, port, out), nprocs=2, join=False)
    for p in ctx.processes:
        p.join(timeout=60)
    alive = [p.is_alive() for p in ctx.processes]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    assert alive == [False, False], "a rank hung in a collective"
    assert all(p.exitcode == 0 for p in ctx.processes)
    (ibot0, c0), (ibot1, c1) = out[0], out[1]
    assert ibot0.item() == 0.0 and ibot1.item() > 0
    # the centre moved by the mean of rank 1's 7 teacher patches alone, identically on both ranks
    want = 0.1 * _criterion_inputs(7, seed=1)[1]["patch_logits"].mean(0, keepdim=True)
    torch.testing.assert_close(c0, want)
    torch.testing.assert_close(c1, want)

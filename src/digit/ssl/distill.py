"""Distillation from a frozen pretrained teacher as a ``Task`` for the one trainer: a small student that sees the raw
(small) image learns the teacher's per-position features and its image-level vector, under photometric and Gaussian
noise augmentation, so that it inherits the teacher's semantics and becomes invariant to what the augmentations change.

The teacher runs once per training image before training (``digit.ssl.teacher_targets``: the clean image and its flip,
cached). Each step, per image: a flip (the flipped image's cached targets), a photometric jitter (brightness, contrast,
saturation), then two student views: the jittered image (``clean``) and the same plus Gaussian noise on the normalised
input at an SNR drawn uniformly in ``snr_db`` (``digit stability``'s definition of noise). Both views regress the clean
image's teacher targets; a consistency term pulls the noisy view's features to the clean view's (stop-gradient).

Losses (:func:`distill_loss`), all ``1 - cosine`` averaged over images (and positions):
``local``: head_l(student token) vs the teacher's layer-normed map vector at the same grid position;
``global``: head_g(mean of the student's tokens) vs the teacher's layer-normed pooled vector;
``consistency``: the noisy view's token vs the clean view's (no head: these are the features a tokenizer quantises).
The student's features are its final-norm output (``--layer 1`` of the exported encoder directory).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from digit.errors import DigitError
from digit.ssl.schedule import check_run_length, student_optimizer
from digit.ssl.teacher_targets import TeacherSpec, TeacherTargets, compute_targets
from digit.training.steps import steps_per_epoch, total_steps
from digit.training.task import OptimizerSpec, TaskBase


@dataclass(kw_only=True)
class DistillConfig:
    data: str
    encoder: str  # the student: a timm ViT name (+ kwargs), e.g. vit_tiny_patch16_224 with {"patch_size": 4}
    encoder_kwargs: dict = field(default_factory=dict)
    image_size: int = 32  # the student's input size (the images are decoded at this size)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    teacher_cache: str | None = None  # None: <run dir>/teacher_targets
    seed: int = 0
    epochs: float = 10.0
    batch_size: int = 256
    lr: float = 5e-4  # peak lr for a batch of 256 (scaled linearly)
    min_lr: float = 1e-6
    warmup_epochs: float | None = None  # None: 10% of the epochs, at most 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip: float = 3.0
    local_weight: float = 1.0
    global_weight: float = 1.0
    consistency_weight: float = 1.0
    snr_db: tuple[float, float] = (10.0, 40.0)  # the noisy view's SNR range (uniform in dB)
    jitter: float = 0.2  # brightness / contrast / saturation factors drawn in [1 - jitter, 1 + jitter]
    limit: int = 0  # a seeded random subset of this many training images (0: all)
    precision: str = "fp32"  # the student's autocast on CPU: "bf16" is ~1.4x faster where the CPU has bf16 units

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(a, b) over every leading position (last axis = features)."""
    return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-6)).mean()


def distill_loss(
    local_pred: torch.Tensor,
    local_target: torch.Tensor,
    global_pred: torch.Tensor,
    global_target: torch.Tensor,
    clean_tokens: torch.Tensor,
    noisy_tokens: torch.Tensor,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> dict[str, torch.Tensor]:
    """The three terms and their weighted sum. Targets are layer-normed here (scale-free, per vector); the clean
    tokens are the consistency target (detached). ``local_pred`` [V, B, N, C] for V views of the same [B, N, C]
    ``local_target``, ``global_pred`` [V, B, G] likewise, tokens [B, N, D]."""
    lt = F.layer_norm(local_target.float(), local_target.shape[-1:])
    gt = F.layer_norm(global_target.float(), global_target.shape[-1:])
    local = cosine_distance(local_pred, lt.expand_as(local_pred))
    glob = cosine_distance(global_pred, gt.expand_as(global_pred))
    cons = cosine_distance(noisy_tokens, clean_tokens.detach())
    wl, wg, wc = weights
    return {"loss": wl * local + wg * glob + wc * cons, "local": local, "global": glob, "consistency": cons}


def add_gaussian_noise(x: torch.Tensor, snr_db: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``digit stability``'s noise with a per-image SNR: sigma^2 = mean(x^2) / 10^(snr/10) on the normalised input."""
    power = x.float().pow(2).flatten(1).mean(1)
    sigma = (power / 10.0 ** (snr_db.to(power) / 10.0)).sqrt().view(-1, 1, 1, 1)
    return x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


class DistillStudent(nn.Module):
    """A timm ViT (its final-norm patch tokens are the features) with linear heads onto the teacher's target spaces."""

    def __init__(self, vit: nn.Module, local_dim: int, global_dim: int) -> None:
        super().__init__()
        self.vit = vit
        dim = int(vit.embed_dim)
        self.local_head = nn.Linear(dim, local_dim)
        self.global_head = nn.Linear(dim, global_dim)
        self.num_prefix = int(getattr(vit, "num_prefix_tokens", 1))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, S, S] -> final-norm patch tokens [B, N, D] (what ``--layer 1`` reads)."""
        return self.vit.forward_features(x)[:, self.num_prefix :]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = self.tokens(x)
        return tok, self.local_head(tok), self.global_head(tok.mean(1))


def load_training_images(data: str, image_size: int, limit: int, seed: int, progress: bool = True):
    """Decode the training images once (a seeded subset with ``limit``): -> DecodedImages (uint8 [N, 3, s, s])."""
    from digit.data.sources import open_image_source
    from digit.ssl.augment import decode_all

    src = open_image_source(data)
    pool = np.arange(len(src))
    if limit and limit < len(pool):
        pool = np.sort(np.random.default_rng([seed, 0x1137]).choice(pool, limit, replace=False))
    images, _, report = decode_all(src, pool, image_size, "decode train", progress)
    report.require_usable(len(images))
    return images


class IndexDataset(torch.utils.data.Dataset):
    """Item i -> {"index": i, "image": uint8 [3, s, s]}; augmentation happens batched in ``compute_loss``."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "image": self.images[i]}


class DistillTask(TaskBase):
    name = "distill"
    unit = "images"

    def __init__(self, cfg: DistillConfig, run_dir: str | Path, *, quiet: bool = False) -> None:
        from digit.tokenizers.encoder import IMAGENET_MEAN, IMAGENET_STD, build_encoder

        self.quiet = quiet
        warm = cfg.warmup_epochs if cfg.warmup_epochs is not None else min(10.0, 0.1 * cfg.epochs)
        cache = cfg.teacher_cache or str(Path(run_dir).resolve() / "teacher_targets")
        cfg = self.cfg = replace(cfg, warmup_epochs=warm, teacher_cache=cache)
        lo, hi = cfg.snr_db
        if not lo <= hi:
            raise DigitError(f"--noise-snr needs MIN <= MAX, got {lo} {hi}")
        if cfg.precision not in ("fp32", "bf16"):
            raise DigitError(f"--student-precision must be fp32 or bf16, got {cfg.precision!r}")
        if not 0 <= cfg.jitter < 1:
            raise DigitError(f"--jitter must be in [0, 1), got {cfg.jitter}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc = build_encoder(
                cfg.encoder, cfg.encoder_kwargs, random_init=True, image_size=cfg.image_size, layer=1, seed=cfg.seed
            )
        if getattr(enc, "family", "vit") != "vit":
            raise DigitError(f"the distillation student must be a timm ViT (got the CNN {cfg.encoder})")
        vit = enc.model.train().requires_grad_(True)
        self._export_vit = copy.deepcopy(vit).cpu().eval()
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)  # the ViT Encoder's normalisation
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        images = load_training_images(cfg.data, cfg.image_size, cfg.limit, cfg.seed, progress=not quiet)
        self.targets: TeacherTargets = compute_targets(cache, cfg.teacher, images.images, progress=not quiet)
        grid = tuple(self.targets.meta["grid"])
        if grid != tuple(enc.grid_size):
            raise DigitError(
                f"the teacher's {cfg.teacher.local_layer} grid at {cfg.teacher.image_size} px is {grid}, the "
                f"student's is {tuple(enc.grid_size)}: change --teacher-size or the student's patch size"
            )
        torch.manual_seed(cfg.seed)  # the heads' init
        self.student = DistillStudent(vit, self.targets.local.shape[-1], self.targets.global_.shape[-1])
        self.dataset = IndexDataset(images.images)
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), cfg.batch_size)
        self.total_steps = total_steps(len(self.dataset), cfg.batch_size, epochs=cfg.epochs)
        self.peak_lr = cfg.lr * cfg.batch_size / 256.0

    # ------------------------------------------------------------ the Task protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def shard_units(self, name: str, module: nn.Module) -> list[nn.Module]:
        return list(module.vit.blocks)

    def optimizers(self) -> list[OptimizerSpec]:
        return [student_optimizer(self.cfg, self.peak_lr, self.steps_per_epoch, self.total_steps)]

    def set_run_length(self, steps_per_epoch: int, total_steps: int) -> None:
        check_run_length("distillation", (self.steps_per_epoch, self.total_steps), (steps_per_epoch, total_steps))

    def views(self, images: torch.Tensor, gen: torch.Generator | None = None):
        """uint8 [B, 3, s, s] -> (flip [B] bool, clean view, noisy view), both normalised. The global torch RNG (the
        trainer seeds and checkpoints it) unless ``gen`` is given."""
        from digit.ssl.augment import color_jitter

        b = images.shape[0]
        dev = images.device
        flip = torch.rand(b, generator=gen) < 0.5
        x = images.float().div(255.0)
        x = torch.where(flip.to(dev).view(-1, 1, 1, 1), x.flip(-1), x)
        j = self.cfg.jitter
        if j > 0:
            bcs = 1 - j + 2 * j * torch.rand(3, b, generator=gen)
            x = color_jitter(x, bcs[0], bcs[1], bcs[2], torch.zeros(b))
        clean = (x - self.mean.to(dev)) / self.std.to(dev)
        lo, hi = self.cfg.snr_db
        snr = lo + (hi - lo) * torch.rand(b, generator=gen)
        noisy = add_gaussian_noise(clean, snr.to(dev), generator=gen)
        return flip, clean, noisy

    def compute_loss(self, batch: dict, step: int, phase: str) -> tuple[torch.Tensor, dict[str, Any]]:
        flip, clean, noisy = self.views(batch["image"])
        local_t, global_t = self.targets.gather(batch["index"], flip)
        dev = clean.device
        b = clean.shape[0]
        bf16 = self.cfg.precision == "bf16" and dev.type == "cpu"  # (CUDA: the trainer's own autocast)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tok, loc, glo = self.student(torch.cat([clean, noisy]))
        out = distill_loss(
            loc.view(2, b, *loc.shape[1:]),
            local_t.to(dev),
            glo.view(2, b, -1),
            global_t.to(dev),
            tok[:b],
            tok[b:],
            (self.cfg.local_weight, self.cfg.global_weight, self.cfg.consistency_weight),
        )
        return out["loss"], {k: v.detach() for k, v in out.items() if k != "loss"}

    # ------------------------------------------------------------ artefacts
    def config(self) -> dict[str, Any]:
        return {"distill": self.cfg.to_dict()}

    def export(self, run_dir: Path, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """The student's ViT as an encoder directory (``--encoder RUN_DIR --layer 1``); heads in model.safetensors."""
        from digit.tokenizers.encoder import save_encoder_dir
        from digit.utils.io import atomic_save_safetensors

        student = weights["student"]
        prefix = "vit."
        self._export_vit.load_state_dict({k[len(prefix) :]: v for k, v in student.items() if k.startswith(prefix)})
        cfg = self.cfg
        extra = {"trained_by": "digit encoder pretrain --teacher (distillation)", "layer": 1,
                 "teacher": cfg.teacher.to_dict(), "teacher_targets_key": self.targets.key}  # fmt: skip
        save_encoder_dir(
            self._export_vit, run_dir, name=cfg.encoder, kwargs=cfg.encoder_kwargs, image_size=cfg.image_size,
            extra=extra,
        )  # fmt: skip
        atomic_save_safetensors(Path(run_dir) / "model.safetensors", student)

"""DINO pretraining as a ``Task`` for the one trainer (``digit.training``): the trainer owns the loop, checkpoints, exact
resume, metrics and the progress bar; this module owns the data pipeline, the student/teacher pair and the losses.

Data: each item is an image (uint8, resized + centre-cropped to ``load_size``) plus its multi-crop parameters drawn
from a generator seeded by (seed, epoch, index) (and its iBOT masks). Views are rendered batched: in the collate
function (DataLoader workers) on CPU, on the GPU inside ``compute_loss`` when CUDA is there. Small datasets are decoded
once into memory (``cache``) so the GPU never waits for JPEG decoding.
Schedules follow DINO (Caron et al. 2021, main_dino.py): lr = ``lr * batch / 256`` with linear warm-up then cosine to
``min_lr``; weight decay cosine 0.04 -> 0.4; teacher momentum cosine 0.996 -> 1; teacher temperature linear warm-up;
prototypes frozen during the first epoch. Every schedule is a pure function of the step (exact resume).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from digit.errors import DigitError
from digit.ssl.augment import DecodedImages, MultiCropAugment, MultiCropConfig, MultiCropDataset, decode_all
from digit.ssl.dino import DINOConfig, DINOCriterion, DINOStudent, linear_warmup
from digit.ssl.knn import knn_accuracy
from digit.ssl.schedule import check_run_length, student_optimizer
from digit.training.ema import ema_update_
from digit.training.steps import steps_per_epoch, total_steps
from digit.training.task import OptimizerSpec, TaskBase, cosine_momentum


@dataclass(kw_only=True)
class DINOTaskConfig:
    data: str
    encoder: str
    encoder_kwargs: dict = field(default_factory=dict)
    image_size: int | None = None  # global crop size; None: the encoder's own input size
    local_size: int | None = None  # None: image_size * 96 / 224 (DINO's ratio), rounded to the patch size
    load_size: int | None = None  # images are resized + centre-cropped to this before cropping views; None: image_size
    val: str | None = None
    val_fraction: float = 0.0
    seed: int = 0
    epochs: float = 100.0
    batch_size: int = 256
    lr: float = 5e-4  # peak lr for a batch of 256 (scaled linearly)
    min_lr: float = 1e-6
    warmup_epochs: float | None = None  # None: 10% of the epochs, at most 10 (DINO: 10 of 100+)
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    warmup_teacher_temp_epochs: float | None = None  # None: 30% of the epochs, at most 30 (DINO: 30)
    freeze_last_layer_epochs: float | None = None  # None: 1% of the epochs, at most 1 (DINO: 1 of 100+)
    clip: float = 3.0
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)  # sizes are filled in from the fields above
    dino: DINOConfig = field(default_factory=DINOConfig)
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_pool: str = "cls"  # "cls" | "patch_mean"
    knn_bank: int = 0  # 0: every labelled training image
    cache: bool | None = None  # decode once into memory; None: when the images fit in 4 GiB
    limit: int = 0  # use a seeded random subset of this many images of --data (0: all)

    def to_dict(self) -> dict:
        return {**asdict(self), "dino": self.dino.to_dict()}


def resolve_sizes(cfg: DINOTaskConfig, encoder_size: int, patch: int) -> DINOTaskConfig:
    """Fill in the default sizes and the derived schedule lengths; the result is what config.json records."""
    size = cfg.image_size or encoder_size
    local = cfg.local_size or max(patch, int(round(size * 96 / 224 / patch)) * patch)
    load = cfg.load_size or size
    warm = cfg.warmup_epochs if cfg.warmup_epochs is not None else min(10.0, 0.1 * cfg.epochs)
    warm_t = cfg.warmup_teacher_temp_epochs
    warm_t = warm_t if warm_t is not None else min(30.0, 0.3 * cfg.epochs)
    freeze = cfg.freeze_last_layer_epochs
    freeze = freeze if freeze is not None else min(1.0, 0.01 * cfg.epochs)
    crops = replace(cfg.crops, global_size=size, local_size=local)
    return replace(
        cfg,
        image_size=size,
        local_size=local,
        load_size=load,
        warmup_epochs=warm,
        warmup_teacher_temp_epochs=warm_t,
        freeze_last_layer_epochs=freeze,
        crops=crops,
    )


# ---------------------------------------------------------------- task


class DINOTask(TaskBase):
    name = "dino"
    unit = "images"

    def __init__(
        self, cfg: DINOTaskConfig, *, workers: int = 0, render_on_device: bool | None = None, quiet: bool = False
    ) -> None:
        from digit.data.sources import open_image_source
        from digit.tokenizers.encoder import build_encoder

        self.cfg, self.workers, self.quiet = cfg, workers, quiet
        # ---- model: the encoder's timm ViT, random init (it is what we train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc = build_encoder(
                cfg.encoder, cfg.encoder_kwargs, random_init=True, image_size=cfg.image_size, layer=1, seed=cfg.seed
            )
        vit = enc.model.train().requires_grad_(True)
        patch = enc.patch_size
        if getattr(enc, "family", "vit") == "cnn":  # a timm CNN: any crop size, its own input normalisation
            patch = 1
            cfg = replace(cfg, crops=replace(cfg.crops, mean=enc.mean_std[0], std=enc.mean_std[1]))
        cfg = self.cfg = resolve_sizes(cfg, enc.image_size, patch)
        for size, what in ((cfg.image_size, "--image-size"), (cfg.local_size, "--local-size")):
            if size % patch:
                raise DigitError(f"{what} {size} is not a multiple of the encoder's patch size {patch}")
        self._export_vit = copy.deepcopy(vit).cpu().eval()
        torch.manual_seed(cfg.seed)  # the head's init
        self.student = DINOStudent(vit, cfg.dino)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.criterion = DINOCriterion(cfg.dino)
        self.render_on_device = torch.cuda.is_available() if render_on_device is None else render_on_device
        src = open_image_source(cfg.data)
        pool = np.arange(len(src))
        if cfg.limit and cfg.limit < len(pool):  # a seeded random subset (short CPU runs)
            pool = np.sort(np.random.default_rng([cfg.seed, 0x1137]).choice(pool, cfg.limit, replace=False))
        # ---- split: a held-out labelled part of the same source, or a separate source
        if cfg.val is not None:
            val_src, train_idx, val_idx = open_image_source(cfg.val), pool, None
        elif cfg.val_fraction > 0:
            perm = np.random.default_rng([cfg.seed, 0x5EED]).permutation(pool)
            n_val = int(round(cfg.val_fraction * len(pool)))
            if not 0 < n_val < len(pool):
                raise DigitError(f"--val-fraction {cfg.val_fraction} leaves no training or no validation images")
            val_src, train_idx, val_idx = src, np.sort(perm[n_val:]), np.sort(perm[:n_val])
        else:
            val_src, train_idx, val_idx = None, pool, None
        self.reports = []
        if cfg.cache is None:  # decode once into memory when it fits in 4 GiB
            cfg = self.cfg = replace(cfg, cache=len(pool) * 3 * cfg.load_size**2 <= 4 << 30)
        train_images, train_labels, to_pos = self._images(src, "train", pool)
        self._train_images, self._train_labels = train_images, train_labels
        self._train_pos = to_pos(train_idx)
        self.aug = MultiCropAugment(cfg.crops)
        self.dataset = MultiCropDataset(
            self._train_images,
            self._train_pos,
            self.aug,
            seed=cfg.seed,
            load_size=cfg.load_size,
            mask_patches=(cfg.image_size // patch) ** 2,
            dino=cfg.dino,
        )
        # ---- schedules, in steps (the trainer's count: drop-last batches)
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), cfg.batch_size)
        self.total_steps = total_steps(len(self.dataset), cfg.batch_size, epochs=cfg.epochs)
        self.peak_lr = cfg.lr * cfg.batch_size / 256.0
        self._momentum = cosine_momentum(cfg.momentum_teacher, 1.0, self.total_steps)
        self._step = 0
        # ---- kNN monitor: bank = labelled training images, queries = the validation split
        self.knn: dict[str, tuple[Dataset, np.ndarray, np.ndarray]] | None = None
        if val_src is not None:
            if not (src.labeled and val_src.labeled):
                warnings.warn("kNN monitor off: the training or validation images have no class labels", stacklevel=2)
            else:
                if val_src is src:
                    val_images, val_labels, val_pos = train_images, train_labels, to_pos(val_idx)
                else:
                    val_images, val_labels, vto = self._images(val_src, "val", np.arange(len(val_src)))
                    val_pos = vto(np.arange(len(val_src)))
                bank = self._train_pos[train_labels[self._train_pos] >= 0]
                if cfg.knn_bank and len(bank) > cfg.knn_bank:
                    bank = np.sort(np.random.default_rng([cfg.seed, 0xBA4C]).choice(bank, cfg.knn_bank, replace=False))
                self.knn = {
                    "bank": (train_images, bank, train_labels[bank]),
                    "val": (val_images, val_pos, val_labels[val_pos]),
                }

    def _images(self, source, what: str, indices: np.ndarray):
        """-> (indexable images, labels by position, map source indices -> positions); decodes ``indices`` once."""
        from digit.data.datasets import ImageDataset, require_usable_image

        if not self.cfg.cache:
            require_usable_image(source)
            return ImageDataset(source, self.cfg.load_size, train=False), np.asarray(source.labels), lambda idx: idx
        images, pos, report = decode_all(source, indices, self.cfg.load_size, f"decode {what}", not self.quiet)
        self.reports.append(report)
        report.require_usable(len(images))

        def to_pos(idx: np.ndarray) -> np.ndarray:
            p = pos[idx]
            return p[p >= 0]

        return images, np.asarray(images.labels), to_pos

    # ------------------------------------------------------------ the Task protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher, "criterion": self.criterion}

    def shard_units(self, name: str, module: nn.Module) -> list[nn.Module]:
        return list(getattr(module.backbone.vit, "blocks", [])) if name in ("student", "teacher") else []

    def optimizers(self) -> list[OptimizerSpec]:
        return [student_optimizer(self.cfg, self.peak_lr, self.steps_per_epoch, self.total_steps)]

    def set_run_length(self, steps_per_epoch: int, total_steps: int) -> None:
        check_run_length("DINO", (self.steps_per_epoch, self.total_steps), (steps_per_epoch, total_steps))

    def teacher_temp(self, step: int) -> float:
        warm = int(round(self.cfg.warmup_teacher_temp_epochs * self.steps_per_epoch))
        return linear_warmup(step, warm, self.cfg.dino.teacher_temp, self.cfg.dino.teacher_temp_final)

    def momentum(self, step: int) -> float:
        return self._momentum(step)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        good = [s for s in samples if s["image"] is not None]
        if not good:
            raise DigitError("a whole batch of images failed to decode; check the data")
        batch = {
            "index": torch.tensor([s["index"] for s in good]),
            "images": torch.stack([s["image"] for s in good]),
            "params": torch.stack([s["params"] for s in good]),
            "skipped": torch.tensor(len(samples) - len(good)),
        }
        if "mask" in good[0]:
            batch["mask"] = torch.stack([s["mask"] for s in good])  # [B, 2, N]
        if not self.render_on_device:  # CPU: render the views here, in the DataLoader workers
            batch["global"], batch["local"] = self.aug.apply(batch.pop("images"), batch.pop("params"))
            if batch["local"] is None:
                del batch["local"]
        return batch

    def count(self, batch: dict) -> int:
        return int(batch["index"].shape[0])

    def before_step(self, step: int) -> None:
        self._step = step
        self.teacher.eval()  # the trainer puts every module in train mode; the teacher never drops anything
        for m in self.teacher.modules():  # ...but, as in DINO, a CNN teacher's BatchNorm normalises with the batch's
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # statistics and keeps its own running ones (exported)
                m.train()
        self.student.freeze_prototypes = step < int(round(self.cfg.freeze_last_layer_epochs * self.steps_per_epoch))

    def before_optimizer_step(self, step: int, phase: str) -> None:
        if self.student.freeze_prototypes:  # no gradient at all, as DINO's cancel_gradients_last_layer: AdamW then
            self.student.head.prototypes.grad = None  # neither decays them nor counts a step in their moments

    def compute_loss(self, batch: dict, step: int, phase: str) -> tuple[torch.Tensor, dict[str, Any]]:
        if "images" in batch:  # GPU path: render the views on the device
            glob, local = self.aug.apply(batch["images"], batch["params"])
        else:
            glob, local = batch["global"], batch.get("local")
        g_flat = glob.flatten(0, 1)  # [2*B, 3, S, S], view-major
        mask = batch["mask"].transpose(0, 1).flatten(0, 1) if "mask" in batch else None  # [2*B, N]
        temp = self.teacher_temp(step)
        with torch.no_grad():
            t_out = self.teacher(g_flat, select=mask)
        s_out = self.student(g_flat, local.flatten(0, 1) if local is not None else None, mask=mask, select=mask)
        out = self.criterion(s_out, t_out, n_global=2, teacher_temp=temp, mask=mask)
        metrics = {
            "dino": out["dino"],
            "target_entropy": out["target_entropy"],
            "batch_entropy": out["batch_entropy"],
            "teacher_temp": temp,
            "momentum": self.momentum(step),
            "skipped": batch["skipped"].float(),
        }
        if self.cfg.dino.ibot_weight > 0:
            metrics["ibot"] = out["ibot"]
        if self.cfg.dino.koleo_weight > 0:
            metrics["koleo"] = out["koleo"]
        return out["loss"], metrics

    def after_optimizer_step(self, step: int, phase: str) -> None:
        ema_update_(list(self.teacher.parameters()), list(self.student.parameters()), self.momentum(step))

    # ------------------------------------------------------------ kNN monitor
    @torch.no_grad()
    def features(self, images: Dataset, positions: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Teacher features (class token or mean patch) of centre-cropped images at the encoder's input size."""
        import torch.nn.functional as F

        from digit.data.datasets import collate_skip

        backbone = self.teacher.backbone
        device = next(backbone.parameters()).device
        mean = torch.tensor(self.cfg.crops.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.crops.std, device=device).view(1, 3, 1, 1)
        if isinstance(images, DecodedImages):  # in memory: slice, no loader
            chunks = torch.from_numpy(positions).split(batch_size)
            loader = ({"images": images.images[c], "failures": []} for c in chunks)
        else:
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(images, positions.tolist()),
                batch_size=batch_size,
                num_workers=self.workers,
                collate_fn=collate_skip,
            )
        feats = []
        for b in loader:
            if len(b["failures"]):
                raise DigitError("an image of the kNN split failed to decode (use the in-memory cache to drop it)")
            x = b["images"].to(device).float().div_(255.0)
            if x.shape[-1] != self.cfg.image_size:
                x = F.interpolate(x, size=self.cfg.image_size, mode="bilinear", antialias=True, align_corners=False)
            cls, patches = backbone((x - mean) / std)
            feats.append((cls if self.cfg.knn_pool == "cls" else patches.mean(1)).float())
        return torch.cat(feats)

    def evaluate(self, step: int) -> dict[str, float]:
        if self.knn is None:
            return {}
        bank_images, bank_pos, bank_labels = self.knn["bank"]
        val_images, val_pos, val_labels = self.knn["val"]
        train_f = self.features(bank_images, bank_pos)
        val_f = self.features(val_images, val_pos)
        n_cls = int(max(bank_labels.max(), val_labels.max())) + 1
        acc = knn_accuracy(
            train_f,
            torch.from_numpy(bank_labels),
            val_f,
            torch.from_numpy(val_labels),
            n_cls,
            k=self.cfg.knn_k,
            temperature=self.cfg.knn_temperature,
        )
        if not self.quiet:
            from tqdm import tqdm

            from digit.utils.distributed import get_dist_info

            if get_dist_info().is_main:
                tqdm.write(
                    f"epoch {step / self.steps_per_epoch:.2f} (step {step}): kNN top-1 {acc:.2%} "
                    f"(k={self.cfg.knn_k}, {len(val_pos)} val / {len(bank_pos)} bank images)"
                )
        return {"knn_top1": acc}

    # ------------------------------------------------------------ artefacts
    def config(self) -> dict[str, Any]:
        return {"dino": self.cfg.to_dict()}

    def export(self, run_dir: Path, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """The teacher (DINO evaluates and keeps the teacher) as an encoder directory, plus the full teacher with its
        head in model.safetensors. The run directory is itself an encoder directory: ``--encoder RUN_DIR``."""
        from digit.tokenizers.encoder import save_encoder_dir
        from digit.utils.io import atomic_save_safetensors

        teacher = weights["teacher"]
        prefix = "backbone.vit."
        self._export_vit.load_state_dict({k[len(prefix) :]: v for k, v in teacher.items() if k.startswith(prefix)})
        cfg = self.cfg
        save_encoder_dir(
            self._export_vit,
            run_dir,
            name=cfg.encoder,
            kwargs=cfg.encoder_kwargs,
            image_size=cfg.image_size,
            extra={"trained_by": "digit encoder pretrain (DINO teacher)"},
        )
        atomic_save_safetensors(Path(run_dir) / "model.safetensors", teacher)

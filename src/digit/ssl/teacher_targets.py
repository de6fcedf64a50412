"""A frozen pretrained teacher's targets, computed once per training image and cached on disk (distillation).

For every training image (uint8, at the student's size) and its horizontal flip, the teacher sees the image upsampled
(bicubic) to ``image_size`` and gives two targets: the feature map at ``local_layer`` (``stride16`` of EfficientNet-Lite0
at 128 px: an 8x8 grid of 112-d vectors, one per student grid position) and the mean-pooled map at ``global_layer``
(``stride32``: a 320-d image vector; mean-pooled, it scores 71% kNN top-1 on CIFAR-10 against 57% for stride 16).
They are stored in float16 as ``.npy`` files read memory-mapped, in a directory whose ``targets.json`` records a key:
a hash of the teacher (name, weights sha256, input size, layers, precision) and of the images' bytes. A directory whose
key differs is recomputed, never silently reused. Writes are staged and renamed (atomic).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from digit.errors import DigitError
from digit.utils.io import atomic_write_json

TARGETS_JSON = "targets.json"
LOCAL_FILE, GLOBAL_FILE = "local.npy", "global.npy"


@dataclass(frozen=True, kw_only=True)
class TeacherSpec:
    name: str = "tf_efficientnet_lite0"
    weights: str = "auto"  # "auto" (a packaged-weights entry of digit.weights) or a state-dict file
    image_size: int = 128  # the teacher's input size (the student's images are upsampled to it)
    local_layer: str = "stride16"  # the per-position target (its grid must equal the student's)
    global_layer: str = "stride32"  # mean-pooled: the image-level semantic target
    precision: str = "bf16"  # the teacher's autocast on CPU ("fp32" for exact float32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_teacher(spec: TeacherSpec):
    """The frozen teacher (a timm CNN with packaged or file weights); a DigitError for unknown names or missing weights."""
    from digit.tokenizers.cnn_encoder import is_cnn_name
    from digit.tokenizers.encoder import build_encoder

    if not is_cnn_name(spec.name):
        raise DigitError(f"--teacher {spec.name!r}: not a timm CNN with feature maps (e.g. tf_efficientnet_lite0)")
    enc = build_encoder(spec.name, weights=spec.weights, image_size=spec.image_size, layer=spec.local_layer)
    return enc.set_precision(spec.precision)


def _feature_index(teacher, layer: str) -> int:
    from digit.tokenizers.cnn_encoder import parse_layer, select_feature

    return select_feature([dict(f) for f in teacher.model.feature_info], parse_layer(layer))


def images_digest(images: torch.Tensor) -> str:
    """sha256 of the uint8 images' bytes and shape: the targets belong to exactly these images, in this order."""
    h = hashlib.sha256(json.dumps(list(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def targets_key(spec: TeacherSpec, teacher, images: torch.Tensor) -> str:
    """The cache key: the teacher (name, weights hash, size, layers, precision) and the images."""
    weights = teacher.source.get("weights", {})
    ident = {**spec.to_dict(), "weights": weights.get("sha256") or weights, "images": images_digest(images)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


@torch.inference_mode()
def teacher_forward(teacher, images: torch.Tensor, spec: TeacherSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, 3, s, s] -> (local [B, h*w, C] float32, global [B, G] float32) from one teacher pass."""
    i_local, i_global = _feature_index(teacher, spec.local_layer), _feature_index(teacher, spec.global_layer)
    x = images.float().div(255.0)
    if x.shape[-1] != spec.image_size:
        x = F.interpolate(x, size=(spec.image_size, spec.image_size), mode="bicubic", align_corners=False)
    x = ((x.clamp(0, 1) - teacher.mean) / teacher.std).to(teacher.device)
    with teacher._autocast(x):
        maps = teacher.model.forward_intermediates(
            x, indices=sorted({i_local, i_global}), stop_early=True, intermediates_only=True
        )
    by_index = dict(zip(sorted({i_local, i_global}), maps, strict=True))
    local = by_index[i_local].float().flatten(2).transpose(1, 2)
    return local, by_index[i_global].float().mean(dim=(2, 3))


class TeacherTargets:
    """Memory-mapped targets: ``local`` [N, 2, h*w, C] and ``global_`` [N, 2, G] float16; axis 1 is (image, flip)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        meta_path = self.dir / TARGETS_JSON
        if not meta_path.is_file():
            raise DigitError(f"{self.dir} holds no teacher targets ({TARGETS_JSON} missing)")
        self.meta = json.loads(meta_path.read_text())
        self.local = np.load(self.dir / LOCAL_FILE, mmap_mode="r")
        self.global_ = np.load(self.dir / GLOBAL_FILE, mmap_mode="r")
        n = int(self.meta["count"])
        if self.local.shape[:2] != (n, 2) or self.global_.shape[:2] != (n, 2):
            raise DigitError(f"{self.dir}: target arrays do not match {TARGETS_JSON} (delete the directory)")

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    def __len__(self) -> int:
        return int(self.meta["count"])

    def gather(self, index: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (local [B, h*w, C], global [B, G]) of images ``index``, flipped where ``flip``."""
        i, f = index.cpu().numpy(), flip.cpu().numpy().astype(np.int64)
        local = torch.from_numpy(np.asarray(self.local[i, f], dtype=np.float32))
        return local, torch.from_numpy(np.asarray(self.global_[i, f], dtype=np.float32))


def compute_targets(
    directory: str | Path,
    spec: TeacherSpec,
    images: torch.Tensor,
    *,
    batch_size: int = 100,
    progress: bool = True,
    teacher=None,
) -> TeacherTargets:
    """The teacher's targets for ``images`` (uint8 [N, 3, s, s]) in ``directory``: reused when its key matches, else
    (re)computed into a staging directory that replaces it when complete."""
    from tqdm import tqdm

    teacher = teacher if teacher is not None else build_teacher(spec)
    key = targets_key(spec, teacher, images)
    directory = Path(directory)
    if (directory / TARGETS_JSON).is_file():
        try:
            cached = TeacherTargets(directory)
            if cached.key == key:
                return cached
        except (DigitError, ValueError, OSError, KeyError):
            pass  # unreadable or partial: recompute below
    n = images.shape[0]
    with torch.inference_mode():
        probe_l, probe_g = teacher_forward(teacher, images[:1], spec)
    grid = int(round(probe_l.shape[1] ** 0.5))
    stage = directory.with_name(directory.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    local = np.lib.format.open_memmap(stage / LOCAL_FILE, "w+", np.float16, (n, 2, *probe_l.shape[1:]))
    glob = np.lib.format.open_memmap(stage / GLOBAL_FILE, "w+", np.float16, (n, 2, probe_g.shape[1]))
    with tqdm(total=n, desc="teacher targets", unit="img", leave=False, disable=not progress) as bar:
        for s in range(0, n, batch_size):
            chunk = images[s : s + batch_size]
            both = torch.cat([chunk, chunk.flip(-1)])
            loc, glo = teacher_forward(teacher, both, spec)
            b = chunk.shape[0]
            local[s : s + b] = loc.view(2, b, *loc.shape[1:]).transpose(0, 1).numpy().astype(np.float16)
            glob[s : s + b] = glo.view(2, b, -1).transpose(0, 1).numpy().astype(np.float16)
            bar.update(b)
    local.flush(), glob.flush()
    del local, glob
    meta = {"key": key, "count": n, "grid": [grid, grid], "teacher": spec.to_dict(),
            "teacher_weights": teacher.source.get("weights", {}), "images_sha256": images_digest(images)}  # fmt: skip
    atomic_write_json(stage / TARGETS_JSON, meta)
    if directory.exists():
        shutil.rmtree(directory)
    stage.rename(directory)
    return TeacherTargets(directory)

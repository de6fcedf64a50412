"""DINO multi-crop augmentation (and the datasets feeding it), batched in torch so the same code runs on GPU batches and in CPU DataLoader workers.

Per view (DINO, Caron et al. 2021, Sec. 3 / appendix; the BYOL colour recipe):
  global 1: random resized crop, flip, colour jitter (p 0.8), grayscale (p 0.2), blur (p 1.0)
  global 2: the same with blur p 0.1 and solarize p 0.2
  local:    a smaller random resized crop at a smaller size, flip, jitter, grayscale, blur (p 0.5)

Every random draw comes from one CPU ``torch.Generator``; parameters are then moved to the images' device, so a batch
gets the same views on CPU and GPU for the same seed. Differences from torchvision, on purpose (batched, no Python loop
per image): crops are resampled bilinearly with ``grid_sample`` (no antialias), jitter runs in a fixed order
(brightness, contrast, saturation, hue), and hue is a rotation of the chroma plane in YIQ space.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from digit.ssl.dino import DINOConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.2989, 0.587, 0.114)  # the luma weights of torchvision's rgb_to_grayscale
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ).tolist()
_RGB2YIQ = _RGB2YIQ.tolist()


@dataclass(kw_only=True)
class MultiCropConfig:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)  # DINO defaults
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    # DINO blurs with sigma in [0.1, 2] pixels at 224 px; here sigma scales with the output size (same look at any size).
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, local
    solarize_p: float = 0.2  # global 2 only
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return asdict(self)


def view_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one image's views: a pure function of (run seed, epoch, dataset index), so the views do not
    depend on batching, worker count, parallel layout or where (CPU worker / GPU) they are rendered."""
    return np.random.default_rng([int(seed), int(epoch), int(index), 0x44494E4F])  # last word: "DINO"


# ---------------------------------------------------------------- geometric


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """images [B, C, H, W] float, boxes [B, 4] (x0, y0, w, h), flip [B] bool -> [B, C, size, size] (bilinear)."""
    B, _, H, W = images.shape
    boxes = boxes.to(images.device, torch.float32)
    x0, y0, w, h = boxes.unbind(1)
    sign = 1.0 - 2.0 * flip.to(images.device, torch.float32)
    theta = torch.zeros(B, 2, 3, device=images.device)
    # output coords in [-1, 1] -> input coords in [-1, 1] (align_corners=False convention)
    theta[:, 0, 0] = sign * w / W
    theta[:, 0, 2] = (2 * x0 + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * y0 + h) / H - 1
    grid = F.affine_grid(theta, [B, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------- photometric


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _per(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.device, x.dtype).view(-1, 1, 1, 1)


def color_jitter(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x [B, 3, H, W] in [0, 1]; per-image factors b, c, s (1 = identity) and hue shift h in turns (0 = identity)."""
    x = (x * _per(b, x)).clamp(0, 1)
    m = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = (_per(c, x) * x + (1 - _per(c, x)) * m).clamp(0, 1)
    x = (_per(s, x) * x + (1 - _per(s, x)) * _gray(x)).clamp(0, 1)
    # hue: rotate (I, Q) by 2*pi*h in YIQ space
    rgb2yiq = torch.tensor(_RGB2YIQ, device=x.device, dtype=x.dtype)
    yiq2rgb = torch.tensor(_YIQ2RGB, device=x.device, dtype=x.dtype)
    ang = 2 * math.pi * h.to(x.device, x.dtype)
    cos, sin = torch.cos(ang), torch.sin(ang)
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    mat = yiq2rgb @ rot @ rgb2yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", mat, x).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (pixels; 0 = identity), reflect padding. Give ``max_sigma`` (a
    bound known in advance) to size the kernel without reading ``sigma`` back from the GPU."""
    B, C, H, W = x.shape
    bound = float(sigma.max()) if max_sigma is None else max_sigma
    radius = max(1, min(int(math.ceil(3 * bound)), (min(H, W) - 1) // 2))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sig = _per(sigma, x).view(B, 1)
    k = torch.exp(-0.5 * (t[None] / sig.clamp(min=1e-6)) ** 2)
    k = torch.where(sig > 0, k, (t[None] == 0).to(x.dtype))
    k = k / k.sum(1, keepdim=True)  # [B, 2r+1]
    k = k.repeat_interleave(C, dim=0)  # one kernel per (image, channel)
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(B * C, 1, 1, -1), groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(B * C, 1, -1, 1), groups=B * C)
    return y.view(B, C, H, W)


# ---------------------------------------------------------------- multi-crop

# Columns of a view's parameter row.
X0, Y0, CW, CH, FLIP, JIT, BRI, CON, SAT, HUE, GRAY, BLUR, SIGMA, SOL = range(14)
N_PARAMS = 14
_TRIES = 10  # RandomResizedCrop attempts before falling back to the whole image (torchvision)


class MultiCropAugment:
    """uint8 / [0, 1] images [B, 3, H, W] -> (global [2, B, 3, S, S], local [L, B, 3, s, s] or None), normalised.

    Two stages: ``draw`` makes one image's parameters [V, 14] from its own generator (in a DataLoader worker), ``apply``
    renders a batch of images with their parameters [B, V, 14] (on the images' device: GPU when there is one).
    """

    def __init__(self, cfg: MultiCropConfig) -> None:
        self.cfg = cfg
        n = 2 + cfg.n_local
        self.n_views = n
        self.sizes = [cfg.global_size] * 2 + [cfg.local_size] * cfg.n_local
        self._scale = np.array([cfg.global_scale] * 2 + [cfg.local_scale] * cfg.n_local)  # [V, 2]
        self._blur_p = np.array([cfg.blur_p[0], cfg.blur_p[1]] + [cfg.blur_p[2]] * cfg.n_local)
        self._sol_p = np.array([0.0, cfg.solarize_p] + [0.0] * cfg.n_local)

    def draw(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """One image's view parameters [V, 14] float32 (crop box in pixels, flags as 0/1, factors), torchvision's
        RandomResizedCrop rule and DINO's probabilities; one vectorised draw per image."""
        cfg, V = self.cfg, self.n_views
        u = rng.random((V, 2 * _TRIES + 12))
        area = height * width * (self._scale[:, :1] + (self._scale[:, 1:] - self._scale[:, :1]) * u[:, :_TRIES])
        lo, hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
        r = np.exp(lo + (hi - lo) * u[:, _TRIES : 2 * _TRIES])
        w, h = np.sqrt(area * r), np.sqrt(area / r)
        fits = (w <= width) & (h <= height)
        first = fits.argmax(1)
        ok = fits.any(1)
        rows = np.arange(V)
        cw = np.where(ok, w[rows, first], width)
        ch = np.where(ok, h[rows, first], height)
        v = u[:, 2 * _TRIES :]
        p = np.zeros((V, N_PARAMS), dtype=np.float64)
        p[:, X0], p[:, Y0], p[:, CW], p[:, CH] = v[:, 0] * (width - cw), v[:, 1] * (height - ch), cw, ch
        p[:, FLIP] = v[:, 2] < 0.5
        p[:, JIT] = v[:, 3] < cfg.jitter_p
        p[:, BRI] = 1 + cfg.brightness * (2 * v[:, 4] - 1)
        p[:, CON] = 1 + cfg.contrast * (2 * v[:, 5] - 1)
        p[:, SAT] = 1 + cfg.saturation * (2 * v[:, 6] - 1)
        p[:, HUE] = cfg.hue * (2 * v[:, 7] - 1)
        p[:, GRAY] = v[:, 8] < cfg.gray_p
        p[:, BLUR] = v[:, 9] < self._blur_p
        p[:, SIGMA] = (
            (cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * v[:, 10]) * np.array(self.sizes) / 224.0
        )
        p[:, SOL] = v[:, 11] < self._sol_p
        return p.astype(np.float32)

    def _render(self, x: torch.Tensor, p: torch.Tensor, size: int) -> torch.Tensor:
        """x [B, 3, H, W] in [0, 1], p [B, 14] -> one normalised view [B, 3, size, size]."""
        cfg = self.cfg
        p = p.to(x.device)
        jit = p[:, JIT] > 0
        one, zero = torch.ones_like(p[:, 0]), torch.zeros_like(p[:, 0])
        y = resized_crop(x, p[:, X0 : CH + 1], p[:, FLIP] > 0, size)
        y = color_jitter(
            y,
            torch.where(jit, p[:, BRI], one),
            torch.where(jit, p[:, CON], one),
            torch.where(jit, p[:, SAT], one),
            torch.where(jit, p[:, HUE], zero),
        )
        y = torch.where(_per(p[:, GRAY], y) > 0, _gray(y).expand_as(y), y)
        y = gaussian_blur(y, torch.where(p[:, BLUR] > 0, p[:, SIGMA], zero), cfg.blur_sigma[1] * size / 224.0)
        y = torch.where((_per(p[:, SOL], y) > 0) & (y >= 0.5), 1.0 - y, y)
        mean = torch.tensor(cfg.mean, device=y.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=y.device).view(1, 3, 1, 1)
        return (y - mean) / std

    @torch.no_grad()
    def apply(self, images: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images uint8 or [0, 1] [B, 3, H, W], params [B, V, 14] -> (global [2, B, ...], local [L, B, ...] | None)."""
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        with torch.autocast(x.device.type, enabled=False):  # pixels stay fp32 inside the trainer's bf16 autocast
            views = [self._render(x, params[:, v], size) for v, size in enumerate(self.sizes)]
        local = torch.stack(views[2:]) if len(views) > 2 else None
        return torch.stack(views[:2]), local


# ---------------------------------------------------------------- datasets feeding the views


class DecodedImages(Dataset):
    """Images decoded once into memory: item i -> (uint8 [3, S, S], label, i, None), like ``ImageDataset``."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), i, None


def decode_all(source, indices: np.ndarray, image_size: int, desc: str, progress: bool = True):
    """Decode ``indices`` of ``source`` once, in storage order (one pass over a .tar.gz).

    -> (DecodedImages of the good ones, map source index -> position or -1, SkipReport)."""
    from tqdm import tqdm

    from digit.data.datasets import SkipReport, load_item

    n = len(source)
    report = SkipReport(source)
    slot = np.full(n, -1, dtype=np.int64)
    slot[indices] = np.arange(len(indices))
    images = torch.empty(len(indices), 3, image_size, image_size, dtype=torch.uint8)
    ok = np.zeros(len(indices), dtype=bool)
    with tqdm(total=len(indices), desc=desc, dynamic_ncols=True, leave=False, disable=not progress) as bar:
        for i, data in source.iter_bytes(lambda i: slot[i] >= 0):
            img, _, _, err = load_item(source, i, data, image_size, False, 0, 0)
            if img is None:
                report.add([(i, err)])
            else:
                images[slot[i]], ok[slot[i]] = img, True
            bar.update(1)
    pos = np.full(n, -1, dtype=np.int64)
    pos[indices[ok]] = np.arange(int(ok.sum()))
    return DecodedImages(images[torch.from_numpy(ok)], np.asarray(source.labels)[indices][ok]), pos, report


class MultiCropDataset(Dataset):
    """Item i -> {"image", "params" [V, 14], "mask" [2, N] (iBOT), "index"}: a pure function of (seed, epoch, i)."""

    def __init__(
        self,
        base: Dataset,
        positions: np.ndarray,
        aug: MultiCropAugment,
        *,
        seed: int,
        load_size: int,
        mask_patches: int,
        dino: DINOConfig,
    ) -> None:
        self.base, self.positions, self.aug = base, positions, aug
        self.seed, self.load_size, self.mask_patches, self.dino, self.epoch = seed, load_size, mask_patches, dino, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.positions[i])
        image, _, _, err = self.base[j]
        rng = view_rng(self.seed, self.epoch, j)
        item = {
            "image": image,
            "params": torch.from_numpy(self.aug.draw(rng, self.load_size, self.load_size)),
            "index": j,
        }
        if self.dino.ibot_weight > 0:
            item["mask"] = torch.from_numpy(self._mask(rng))
        return item

    def _mask(self, rng: np.random.Generator) -> np.ndarray:
        """iBOT random masking of the two global crops: with prob ``mask_prob`` a ratio ~ U(mask_ratio) of patches."""
        n, cfg = self.mask_patches, self.dino
        u = rng.random((2, 2))
        keys = rng.random((2, n))
        k = np.maximum(1, np.round((cfg.mask_ratio[0] + (cfg.mask_ratio[1] - cfg.mask_ratio[0]) * u[:, 1]) * n))
        ranks = keys.argsort(1).argsort(1)
        return (ranks < k[:, None]) & (u[:, :1] < cfg.mask_prob)

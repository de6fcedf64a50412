"""Preprocessing as the paper does it: resize the shorter side (bicubic) then crop to the model's input size.

Evaluation / tokenization: center crop. Training features (K-means, VQ / encoder training): random crop + horizontal
flip, drawn from a per-image generator seeded by (seed, epoch, index), so results do not depend on worker scheduling.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    return TF.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)


def preprocess(
    img: Image.Image, size: int, *, train: bool = False, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, size, size]."""
    img = resize_shorter(img, size)
    if train:
        if rng is None:
            raise ValueError("training crops need an rng")
        top = int(rng.integers(0, img.height - size + 1))
        left = int(rng.integers(0, img.width - size + 1))
        img = TF.crop(img, top, left, size, size)
        if rng.random() < 0.5:
            img = TF.hflip(img)
    else:
        img = TF.center_crop(img, [size, size])
    return TF.pil_to_tensor(img)

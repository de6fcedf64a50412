"""Image arrays at the boundary: float [0, 1] tensors -> uint8 arrays, labelled grids, atomic PNG files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] by truncation, as DiGIT saves samples (clip(x*255).astype)."""
    return (images01.float() * 255.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(
    images: np.ndarray, captions: list[str] | None = None, ncols: int | None = None, pad: int = 2
) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 [rows*(H+cap+pad)+pad, cols*(W+pad)+pad, 3] grid, captions drawn above."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    cap_h = 12 if captions else 0
    cell_h, cell_w = h + cap_h + pad, w + pad
    canvas = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, ncols)
        x, y = pad + c * cell_w, pad + r * cell_h
        if captions:
            draw.text((x, y), captions[i][: max(1, w // 6)], fill=(0, 0, 0))
        canvas.paste(Image.fromarray(images[i]), (x, y + cap_h))
    return np.asarray(canvas)


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a uint8 [H, W, 3] array as PNG, atomically."""
    from PIL import Image

    from digit.utils.io import atomic_write

    return atomic_write(path, lambda p: Image.fromarray(image).save(p, format="PNG"))

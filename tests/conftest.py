"""Shared test fixtures: generated images (no files outside the test's tmp dir) and a tiny DINOv2-shaped ViT."""

from __future__ import annotations

import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing in the suite may reach a hub

# Tiny models run many small ops: on 2 cores, one intra-op thread is several times faster than two (and
# torchrun tests start their own processes next to this one).
torch.set_num_threads(1)

TINY_VIT = "vit_small_patch14_reg4_dinov2"
TINY_VIT_KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2}
TINY_IMAGE_SIZE = 56  # 4x4 patches of 14


def tiny_fit_argv(data, out, clusters: int, *extra) -> list[str]:
    """`digit tokenizer fit` arguments for the tiny random-init ViT (layer 1, no DataLoader workers)."""
    return [
        "tokenizer", "fit", "--data", str(data), "--encoder", TINY_VIT, "--encoder-kwargs", json.dumps(TINY_VIT_KWARGS),
        "--random-init", "--image-size", str(TINY_IMAGE_SIZE), "--layer", "1", "--clusters", str(clusters),
        "--workers", "0", *map(str, extra), "--out", str(out),
    ]  # fmt: skip


def make_image(rng: np.random.Generator, size: tuple[int, int], base_color) -> Image.Image:
    """A smooth-ish colored image with a random rectangle: structure a ViT can tell apart."""
    h, w = size
    img = np.empty((h, w, 3), dtype=np.float32)
    img[:] = np.asarray(base_color, dtype=np.float32)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y0 : y0 + h // 2, x0 : x0 + w // 2] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_image_folder(
    root: Path, classes=("cat", "dog"), n_per_class: int = 4, size=(40, 52), seed: int = 0, fmt: str = "PNG"
) -> Path:
    rng = np.random.default_rng(seed)
    colors = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200)]
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            ext = "jpg" if fmt == "JPEG" else fmt.lower()
            make_image(rng, size, colors[c % len(colors)]).save(d / f"img_{i:03d}.{ext}", format=fmt)
    return root


def tar_folder(folder: Path, out: Path, top: str | None = "train") -> Path:
    """Archive ``folder`` (optionally under one top-level directory, like the CIFAR-10 archive)."""
    mode = "w:gz" if out.name.endswith(".gz") else "w"
    with tarfile.open(out, mode) as tf:
        # deliberately not sorted: the source must sort, not rely on archive order
        for p in sorted(folder.rglob("*"), reverse=True):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                tf.add(p, arcname=f"{top}/{rel}" if top else rel)
    return out


@pytest.fixture
def ctrl_c_handled():
    """Ctrl-C as in a terminal (KeyboardInterrupt), even where the test process was started with SIGINT ignored (a
    background job): the interrupt tests send themselves SIGINT."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")

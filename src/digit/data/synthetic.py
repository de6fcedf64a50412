"""A small labelled image set generated from a seed: colored shapes on textured backgrounds, one class per shape/color.

It lets the quickstart (and anyone without a dataset at hand) run the whole pipeline offline. Classes differ in shape
and hue, so a self-supervised encoder, a tokenizer and a class-conditional GPT all have real structure to learn.

    python -m digit.data.synthetic --out shapes/ --per-class 50 --size 32
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring")
HUES = ((220, 50, 50), (50, 90, 220), (40, 170, 60), (230, 180, 30))


def class_names(n_classes: int) -> list[str]:
    return [f"{SHAPES[i % len(SHAPES)]}_{i // len(SHAPES)}" for i in range(n_classes)]


def draw_shape(rng: np.random.Generator, cls: int, size: int) -> Image.Image:
    shape = SHAPES[cls % len(SHAPES)]
    color = np.array(HUES[(cls // len(SHAPES)) % len(HUES)])
    bg = rng.integers(0, 90, 3)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.36)
    cx, cy = size * rng.uniform(0.35, 0.65, 2)
    fill = tuple(int(v) for v in np.clip(color + rng.integers(-30, 31, 3), 0, 255))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = r / 3
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        d.ellipse(box, outline=fill, width=max(1, int(r / 3)))
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_shapes_dataset(
    out: str | os.PathLike, *, n_classes: int = 10, per_class: int = 50, size: int = 32, seed: int = 0
) -> Path:
    """Write ``out/<class>/<i>.png`` (ImageFolder layout). Same seed, same bytes."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(class_names(n_classes)):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(rng, c, size).save(out / name / f"{i:05d}.png")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a synthetic labelled shapes dataset (ImageFolder layout).")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if min(a.classes, a.per_class, a.size) < 1 or a.size < 8:
        p.error("--classes and --per-class must be >= 1 and --size >= 8")
    write_shapes_dataset(a.out, n_classes=a.classes, per_class=a.per_class, size=a.size, seed=a.seed)
    print(f"wrote {a.classes} x {a.per_class} images of {a.size}x{a.size} to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

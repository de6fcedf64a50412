"""Prompt alignment of generated scenes: an attribute classifier trained on real renders, and the score it gives.

The classifier (a small seeded CNN) predicts, for each slot (left / right half), the shape or "none", the colour and
the size. A generated image *aligns* with its prompt on

    layout   the occupied slots are the prompt's (an object where one was asked, none elsewhere)
    shape    every prompted object's shape is right (in its slot)
    color    every prompted object's colour is right
    size     every prompted object's size is right
    all      all four at once

and each figure is the fraction of images that do, reported for prompts on seen and on held-out (unseen) colour-shape
pairs. The classifier's own score on real held-out renders (`classifier-test/`, their true captions) is the ceiling
and is recorded with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digit.data.scenes import COLORS, SHAPES, SIZES, SLOTS, Scene, parse_caption
from digit.errors import DigitError

ATTRIBUTES = ("layout", "shape", "color", "size", "all")
SHAPE_CLASSES = ("none", *SHAPES)  # index 0: an empty slot
CONFIG_FILE, WEIGHTS_FILE = "classifier.json", "model.safetensors"


def scene_targets(scenes: list[Scene]) -> np.ndarray:
    """int64 [N, slots, 3]: (shape index in SHAPE_CLASSES, colour index, size index); colour and size -1 when empty."""
    out = np.full((len(scenes), len(SLOTS), 3), -1, dtype=np.int64)
    for i, scene in enumerate(scenes):
        for j, obj in enumerate(scene.slots()):
            out[i, j, 0] = 0
            if obj is not None:
                out[i, j] = (SHAPE_CLASSES.index(obj.shape), COLORS.index(obj.color), SIZES.index(obj.size))
    return out


def alignment_flags(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image bool [N] for each attribute (see the module docstring). ``pred`` and ``target``: [N, slots, 3] as
    :func:`scene_targets` (predictions carry a colour and size in every slot; only prompted slots are checked)."""
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[1:] != (len(SLOTS), 3):
        raise DigitError(f"predictions {list(pred.shape)} and targets {list(target.shape)} must both be [N, 2, 3]")
    wanted = target[..., 0] > 0  # [N, slots]
    layout = ((pred[..., 0] > 0) == wanted).all(1)
    flags = {"layout": layout}
    for k, name in enumerate(("shape", "color", "size")):
        flags[name] = ((pred[..., k] == target[..., k]) | ~wanted).all(1)
    flags["all"] = flags["layout"] & flags["shape"] & flags["color"] & flags["size"]
    return flags


def alignment_summary(pred: np.ndarray, target: np.ndarray, unseen: np.ndarray) -> dict[str, Any]:
    """{"seen"|"unseen"|"all": {"n": count, attribute: fraction}}; a group without images has n 0 and no fractions."""
    flags = alignment_flags(pred, target)
    unseen = np.asarray(unseen, dtype=bool)
    out: dict[str, Any] = {}
    for group, sel in (("seen", ~unseen), ("unseen", unseen), ("all", np.ones_like(unseen))):
        n = int(sel.sum())
        out[group] = {"n": n, **({a: float(flags[a][sel].mean()) for a in ATTRIBUTES} if n else {})}
    return out


def prompts_targets(prompts: list[str], holdout: set[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(targets [N, 2, 3], unseen bool [N]) of the prompts (each must parse as a scenes caption)."""
    scenes = [parse_caption(p) for p in prompts]
    return scene_targets(scenes), np.array([bool(s.pairs() & holdout) for s in scenes], dtype=bool)


@dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 32
    width: int = 32
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_classifier(cfg: ClassifierConfig):
    """A small CNN: 3 stride-2 stages to an (S/8)^2 map, flattened (slots are positions), one linear layer per output:
    per slot, 4 shape logits (none + 3), 4 colour logits and 2 size logits."""
    import torch
    from torch import nn

    w, s = cfg.width, cfg.image_size // 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        net = nn.Sequential(
            *block(3, w, 1),
            *block(w, w, 2),
            *block(w, 2 * w, 1),
            *block(2 * w, 2 * w, 2),
            *block(2 * w, 2 * w, 1),
            *block(2 * w, 2 * w, 2),
            nn.Flatten(),
            nn.Linear(2 * w * s * s, 256),
            nn.ReLU(),
            nn.Linear(256, len(SLOTS) * (len(SHAPE_CLASSES) + len(COLORS) + len(SIZES))),
        )
    return net


def _split_logits(logits):
    n = logits.shape[0]
    x = logits.view(n, len(SLOTS), -1)
    a, b = len(SHAPE_CLASSES), len(SHAPE_CLASSES) + len(COLORS)
    return x[..., :a], x[..., a:b], x[..., b:]


def _as_input(images: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)


def predict(net, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 [N, S, S, 3] -> int64 [N, slots, 3] (argmax of each head)."""
    import torch

    net.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            sh, co, si = _split_logits(net(_as_input(images[s : s + batch_size])))
            out.append(torch.stack([sh.argmax(-1), co.argmax(-1), si.argmax(-1)], -1).numpy())
    return np.concatenate(out).astype(np.int64)


def train_classifier(
    images: np.ndarray, targets: np.ndarray, cfg: ClassifierConfig, progress: bool = False
) -> tuple[Any, list[float]]:
    """Fit the classifier on real renders (uint8 [N, S, S, 3], targets [N, 2, 3]); -> (net, mean loss per epoch).
    Seeded: init, shuffling and nothing else random, so a run repeats exactly on the same machine."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise DigitError(f"images are {images.shape[1]}x{images.shape[2]}, the classifier is {cfg.image_size}px")
    if cfg.image_size % 8:
        raise DigitError(f"classifier image size {cfg.image_size} must be a multiple of 8")
    net = build_classifier(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = _as_input(images), torch.from_numpy(targets)
    losses = []
    for _ in tqdm(range(cfg.epochs), desc="classifier", unit="epoch", disable=not progress):
        net.train()
        order, total = torch.randperm(len(images), generator=gen), 0.0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            y = y_all[idx]
            sh, co, si = _split_logits(net(x_all[idx]))
            loss = F.cross_entropy(sh.reshape(-1, sh.shape[-1]), y[..., 0].reshape(-1))
            loss = loss + F.cross_entropy(co.reshape(-1, co.shape[-1]), y[..., 1].reshape(-1), ignore_index=-1)
            loss = loss + F.cross_entropy(si.reshape(-1, si.shape[-1]), y[..., 2].reshape(-1), ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(images))
    return net.eval(), losses


def save_classifier(net, cfg: ClassifierConfig, out: Path, record: dict[str, Any]) -> None:
    from digit.utils.io import atomic_save_safetensors, atomic_write_json

    atomic_save_safetensors(out / WEIGHTS_FILE, {k: v.contiguous() for k, v in net.state_dict().items()})
    atomic_write_json(out / CONFIG_FILE, {"type": "scenes-attribute-classifier", "config": cfg.to_dict(), **record})


def load_classifier(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """(net in eval mode, its classifier.json) from a `digit scenes classifier` directory."""
    from safetensors.torch import load_file

    from digit.utils.artifacts import read_json_object

    directory = Path(directory)
    rec = read_json_object(directory / CONFIG_FILE)
    if rec.get("type") != "scenes-attribute-classifier" or not isinstance(rec.get("config"), dict):
        raise DigitError(f"{directory}: not a `digit scenes classifier` directory")
    try:
        cfg = ClassifierConfig(**rec["config"])
    except TypeError as e:
        raise DigitError(f"{directory / CONFIG_FILE}: bad classifier config ({e})") from e
    net = build_classifier(cfg)
    wpath = directory / WEIGHTS_FILE
    if not wpath.is_file():
        raise DigitError(f"{wpath}: file not found")
    try:
        net.load_state_dict(load_file(str(wpath)))
    except Exception as e:  # a truncated or foreign file: one line naming it
        raise DigitError(f"{wpath}: not this classifier's weights ({str(e).splitlines()[0][:200]})") from e
    return net.eval(), rec


def read_generated(path: str | os.PathLike) -> np.ndarray:
    """uint8 [N, S, S, 3] from a generation directory (its samples.npz) or a .npz with an ``images`` array."""
    path = Path(path)
    npz = path / "samples.npz" if path.is_dir() else path
    if not npz.is_file():
        raise DigitError(f"{path}: no samples.npz (a `digit generate` output) or .npz file")
    try:
        with np.load(npz, allow_pickle=False) as f:
            images = f["images"]
    except (OSError, ValueError, KeyError) as e:
        raise DigitError(f"{npz}: not an .npz with an 'images' array ({e})") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DigitError(f"{npz}: 'images' must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    return images

"""Compositional scenes with captions: where text-to-image prompt alignment can be measured (`digit scenes make`).

A scene has one or two objects, one in each half of the image (the *slots*: left, right). An object has a shape,
a colour and a size. Captions follow one small grammar, so a caption parses back to its scene exactly:

    a large red circle on the left                                   (one object)
    a large red circle to the left of a small blue square            (two: the first named is in the left slot)
    a small blue square to the right of a large red circle           (the same scene, named the other way round)

Some colour-shape pairs are held out: no training scene contains them (``train/``), so prompts naming them measure
generalisation to unseen combinations. The classifier splits (``classifier-train/``, ``classifier-test/``) draw from
every combination, so the attribute classifier that scores generated images is not blind to the held-out ones.

Layout written (each split a flat folder of PNGs with a Hugging Face ``metadata.jsonl``: ``file_name``, ``text``, and
the ``scene`` it renders), plus ``scenes.json`` (vocabulary, held-out pairs, seed, sizes) and ``prompts.txt`` (the
sampling prompts: ``n_prompts`` on seen combinations, then ``n_prompts`` naming at least one held-out pair).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from digit.errors import DigitError

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
SLOTS = ("left", "right")
RGB = {"red": (220, 45, 45), "green": (40, 175, 60), "blue": (50, 90, 230), "yellow": (230, 205, 40)}
RADIUS = {"small": 0.11, "large": 0.19}  # of the image side
# held out of the training split by default: each shape and each colour stays seen in other pairs
DEFAULT_HOLDOUT = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
SPLITS = ("train", "classifier-train", "classifier-test")
SCENES_FILE, PROMPTS_FILE, METADATA = "scenes.json", "prompts.txt", "metadata.jsonl"
FORMAT = "digit-scenes"
RENDER_SCALE = 4  # drawn at 4x, then box-downsampled: anti-aliased edges at 32 px


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str

    def words(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"

    def to_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size}


@dataclass(frozen=True)
class Scene:
    """``left`` / ``right``: the object in each slot (None when empty, never both); ``first``: the slot the caption
    names first (two objects only)."""

    left: SceneObject | None
    right: SceneObject | None
    first: str = "left"

    def slots(self) -> tuple[SceneObject | None, SceneObject | None]:
        return self.left, self.right

    def caption(self) -> str:
        if self.left is None or self.right is None:
            side = "left" if self.left is not None else "right"
            return f"{(self.left or self.right).words()} on the {side}"
        a, b = (self.left, self.right) if self.first == "left" else (self.right, self.left)
        return f"{a.words()} to the {self.first} of {b.words()}"

    def pairs(self) -> set[tuple[str, str]]:
        return {(o.color, o.shape) for o in self.slots() if o is not None}

    def to_dict(self) -> dict[str, Any]:
        return {s: (o.to_dict() if o is not None else None) for s, o in zip(SLOTS, self.slots())}


_OBJ = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_ONE = re.compile(rf"^{_OBJ} on the (left|right)$")
_TWO = re.compile(rf"^{_OBJ} to the (left|right) of {_OBJ}$")


def parse_caption(text: str) -> Scene:
    """The scene a caption of this grammar describes; anything else is a DigitError quoting it."""
    t = " ".join(text.strip().lower().split())
    if m := _ONE.match(t):
        obj = SceneObject(shape=m[3], color=m[2], size=m[1])
        return Scene(obj, None) if m[4] == "left" else Scene(None, obj)
    if m := _TWO.match(t):
        a, b = SceneObject(shape=m[3], color=m[2], size=m[1]), SceneObject(shape=m[7], color=m[6], size=m[5])
        return Scene(a, b, "left") if m[4] == "left" else Scene(b, a, "right")
    raise DigitError(
        f"not a scenes caption: {text!r} (expected e.g. 'a large red circle to the left of a small blue square')"
    )


def parse_holdout(value: str) -> tuple[tuple[str, str], ...]:
    """``"red-triangle,green-circle"`` -> pairs; ``"none"`` -> no held-out pair."""
    if value.strip().lower() == "none":
        return ()
    pairs = []
    for item in value.split(","):
        color, _, shape = item.strip().lower().partition("-")
        if color not in COLORS or shape not in SHAPES:
            raise DigitError(
                f"--holdout {item!r}: expected COLOR-SHAPE with a colour of {COLORS} and a shape of {SHAPES}"
            )
        pairs.append((color, shape))
    if len(set(pairs)) == len(COLORS) * len(SHAPES):
        raise DigitError("--holdout names every colour-shape pair: nothing would be left to train on")
    return tuple(dict.fromkeys(pairs))


def random_scene(rng: np.random.Generator, holdout: set[tuple[str, str]], want: str = "seen") -> Scene:
    """A scene with one (40%) or two (60%) objects. ``want``: "seen" (no held-out pair), "unseen" (at least one),
    or "any" (every combination)."""
    if want == "unseen" and not holdout:
        raise DigitError("no held-out pairs, so no unseen scene can be drawn")
    while True:
        objs = [
            SceneObject(shape=SHAPES[rng.integers(len(SHAPES))], color=COLORS[rng.integers(len(COLORS))],
                        size=SIZES[rng.integers(len(SIZES))])
            for _ in range(1 + int(rng.random() < 0.6))
        ]  # fmt: skip
        if len(objs) == 1:
            scene = Scene(objs[0], None) if rng.random() < 0.5 else Scene(None, objs[0])
        else:
            scene = Scene(objs[0], objs[1], SLOTS[rng.integers(2)])
        unseen = bool(scene.pairs() & holdout)
        if want == "any" or unseen == (want == "unseen"):
            return scene


def render_scene(scene: Scene, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 [size, size, 3]: a dark random background, each object in its half with jittered position and colour."""
    s = size * RENDER_SCALE
    bg = tuple(int(v) for v in rng.integers(0, 45, 3))
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    for slot, obj in zip(SLOTS, scene.slots()):
        # drawn even when empty, so the random stream does not depend on which slots are filled
        jx, jy, jc = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.integers(-20, 21, 3)
        if obj is None:
            continue
        r = RADIUS[obj.size] * s
        cx = s * ((0.25 if slot == "left" else 0.75) + 0.05 * jx)
        cy = s * 0.5 + jy * (0.47 * s - r)
        fill = tuple(int(v) for v in np.clip(np.array(RGB[obj.color]) + jc, 0, 255))
        if obj.shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            h = r * 0.85
            d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    small = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float64)
    return np.clip(small + rng.normal(0, 3, small.shape), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ScenesConfig:
    n: int = 2000  # training scenes (held-out pairs excluded)
    n_classifier: int = 2000  # classifier training renders (every pair)
    n_test: int = 500  # classifier test renders (every pair)
    n_prompts: int = 24  # sampling prompts per group (seen, unseen)
    size: int = 32
    seed: int = 0
    holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "n_classifier": self.n_classifier, "n_test": self.n_test, "n_prompts": self.n_prompts,
                "size": self.size, "seed": self.seed, "holdout": [list(p) for p in self.holdout]}  # fmt: skip


def _write_split(folder: Path, scenes: list[Scene], rng: np.random.Generator, size: int, progress: bool) -> None:
    from tqdm import tqdm

    folder.mkdir(parents=True)
    lines = []
    for i, scene in enumerate(tqdm(scenes, desc=folder.name, unit="img", disable=not progress)):
        name = f"{i:05d}.png"
        Image.fromarray(render_scene(scene, rng, size)).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": scene.caption(), "scene": scene.to_dict()}))
    (folder / METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_scenes(tmp: str | os.PathLike, cfg: ScenesConfig, progress: bool = False) -> dict[str, Any]:
    """Write the dataset into the (staging) folder ``tmp``. Same config, same bytes. -> the scenes.json record."""
    if cfg.size < 16:
        raise DigitError(f"--size {cfg.size}: scenes need at least 16 pixels")
    if min(cfg.n, cfg.n_classifier, cfg.n_test) < 1:
        raise DigitError("every split needs at least one image")
    tmp, holdout = Path(tmp), set(cfg.holdout)
    rng = np.random.default_rng(cfg.seed)
    # one child generator per split and for the prompts: changing one count leaves the others' scenes unchanged
    seeds = rng.spawn(4)
    wants = {"train": "seen", "classifier-train": "any", "classifier-test": "any"}
    counts = {"train": cfg.n, "classifier-train": cfg.n_classifier, "classifier-test": cfg.n_test}
    for split, srng in zip(SPLITS, seeds):
        scenes = [random_scene(srng, holdout, wants[split]) for _ in range(counts[split])]
        _write_split(tmp / split, scenes, srng, cfg.size, progress)
    prng = seeds[3]
    prompts = [random_scene(prng, holdout, "seen").caption() for _ in range(cfg.n_prompts)]
    if holdout:
        prompts += [random_scene(prng, holdout, "unseen").caption() for _ in range(cfg.n_prompts)]
    (tmp / PROMPTS_FILE).write_text("\n".join(prompts) + "\n", encoding="utf-8")
    record = {
        "format": FORMAT, "version": 1, **cfg.to_dict(), "shapes": list(SHAPES), "colors": list(COLORS),
        "sizes": list(SIZES), "slots": list(SLOTS), "splits": counts, "prompts": PROMPTS_FILE,
        "note": "train/ holds no scene with a held-out colour-shape pair; classifier-train/ and classifier-test/ "
                "draw from every pair; prompts.txt: n_prompts seen prompts, then n_prompts naming a held-out pair",
    }  # fmt: skip
    (tmp / SCENES_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def read_scenes_info(root: str | os.PathLike) -> dict[str, Any]:
    """scenes.json of a dataset written by `digit scenes make`, checked."""
    from digit.utils.artifacts import read_json_object

    path = Path(root) / SCENES_FILE
    if not path.is_file():
        raise DigitError(f"{root}: not a scenes dataset (no {SCENES_FILE}; write one with `digit scenes make`)")
    info = read_json_object(path)
    if info.get("format") != FORMAT or not isinstance(info.get("holdout"), list):
        raise DigitError(f"{path}: not a {FORMAT} record")
    return info


def read_split(folder: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """(uint8 images [N, S, S, 3], captions) of one split folder, in metadata.jsonl order."""
    folder = Path(folder)
    meta = folder / METADATA
    if not meta.is_file():
        raise DigitError(f"{folder}: no {METADATA} (a split of `digit scenes make`)")
    images, texts = [], []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            name, text = rec["file_name"], rec["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DigitError(f"{meta}: line {lineno}: expected an object with file_name and text") from e
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
            raise DigitError(f"{meta}: line {lineno}: image {name!r} not found in {folder}")
        with Image.open(path) as im:
            images.append(np.asarray(im.convert("RGB")))
        texts.append(text)
    if not images:
        raise DigitError(f"{meta}: no images listed")
    if len({im.shape for im in images}) != 1:
        raise DigitError(f"{folder}: images of different sizes")
    return np.stack(images), texts

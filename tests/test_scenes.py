"""The compositional scenes dataset: caption grammar, held-out pairs, rendering, determinism, the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import pytest

from digit.cli import main
from digit.data.scenes import (
    COLORS,
    DEFAULT_HOLDOUT,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    ScenesConfig,
    parse_caption,
    parse_holdout,
    random_scene,
    render_scene,
    write_scenes,
)
from digit.errors import DigitError

OBJECTS = [SceneObject(shape=s, color=c, size=z) for s, c, z in itertools.product(SHAPES, COLORS, SIZES)]


def test_every_caption_parses_back_to_its_scene():
    for obj in OBJECTS:
        for scene in (Scene(obj, None), Scene(None, obj)):
            assert parse_caption(scene.caption()) == scene
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = OBJECTS[rng.integers(len(OBJECTS))], OBJECTS[rng.integers(len(OBJECTS))]
        left_first, right_first = Scene(a, b, "left"), Scene(a, b, "right")
        assert left_first.caption() == f"{a.words()} to the left of {b.words()}"
        assert right_first.caption() == f"{b.words()} to the right of {a.words()}"  # b is in the right slot
        for scene in (left_first, right_first):
            assert parse_caption(scene.caption()) == scene
            assert parse_caption(scene.caption()).slots() == (a, b)
    assert parse_caption("  A large RED circle   on the left ") == Scene(SceneObject("circle", "red", "large"), None)


@pytest.mark.parametrize(
    "text",
    ["", "a large red circle", "a huge red circle on the left", "a large purple circle on the left",
     "a large red circle to the left of", "two large red circles on the left", "a large red circle on the top"],
)  # fmt: skip
def test_other_text_is_refused(text):
    with pytest.raises(DigitError, match="not a scenes caption"):
        parse_caption(text)


def test_holdout_parsing():
    assert parse_holdout("red-triangle, Green-circle,red-triangle") == (("red", "triangle"), ("green", "circle"))
    assert parse_holdout("none") == ()
    for bad in ("red", "red-hexagon", "purple-circle", "red-triangle,"):
        with pytest.raises(DigitError, match="COLOR-SHAPE"):
            parse_holdout(bad)
    every = ",".join(f"{c}-{s}" for c in COLORS for s in SHAPES)
    with pytest.raises(DigitError, match="nothing would be left"):
        parse_holdout(every)


def test_random_scenes_respect_the_held_out_pairs():
    rng, holdout = np.random.default_rng(1), set(DEFAULT_HOLDOUT)
    seen = [random_scene(rng, holdout, "seen") for _ in range(300)]
    unseen = [random_scene(rng, holdout, "unseen") for _ in range(100)]
    assert all(not (s.pairs() & holdout) for s in seen)
    assert all(s.pairs() & holdout for s in unseen)
    n_two = sum(s.left is not None and s.right is not None for s in seen)
    assert 0.45 < n_two / len(seen) < 0.75  # about 60% two-object scenes
    with pytest.raises(DigitError, match="no held-out pairs"):
        random_scene(rng, set(), "unseen")


def _mask(img: np.ndarray, color: str) -> np.ndarray:
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return {"red": (r > 150) & (g < 110) & (b < 110), "blue": (b > 150) & (r < 120) & (g < 150)}[color]


def test_render_puts_each_object_in_its_half_with_its_colour_and_size():
    rng = np.random.default_rng(0)
    big, small = SceneObject("square", "red", "large"), SceneObject("circle", "blue", "small")
    img = render_scene(Scene(big, small), rng, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    red, blue = _mask(img, "red"), _mask(img, "blue")
    assert red[:, :16].sum() > 40 and red[:, 16:].sum() == 0
    assert blue[:, 16:].sum() > 10 and blue[:, :16].sum() == 0
    assert red.sum() > 2 * blue.sum()  # large against small
    empty = render_scene(Scene(None, small), rng, 32)
    assert _mask(empty, "blue")[:, :16].sum() == 0 and _mask(empty, "blue")[:, 16:].sum() > 10


def _digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_dataset_is_seeded_consistent_and_keeps_held_out_pairs_out_of_train(tmp_path):
    cfg = ScenesConfig(n=30, n_classifier=20, n_test=10, n_prompts=5, size=32, seed=3)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_scenes(tmp_path / name, cfg)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    (tmp_path / "c").mkdir()
    write_scenes(tmp_path / "c", ScenesConfig(n=30, n_classifier=20, n_test=10, n_prompts=5, size=32, seed=4))
    assert _digest(tmp_path / "a")["train/00000.png"] != _digest(tmp_path / "c")["train/00000.png"]

    root, holdout = tmp_path / "a", set(DEFAULT_HOLDOUT)
    info = json.loads((root / "scenes.json").read_text())
    assert info["holdout"] == [list(p) for p in DEFAULT_HOLDOUT] and info["seed"] == 3
    assert info["splits"] == {"train": 30, "classifier-train": 20, "classifier-test": 10}
    for split, n in info["splits"].items():
        recs = [json.loads(line) for line in (root / split / "metadata.jsonl").read_text().splitlines()]
        assert len(recs) == n and len(list((root / split).glob("*.png"))) == n
        for r in recs:
            scene = parse_caption(r["text"])
            assert scene.to_dict() == r["scene"]  # the caption says what the scene record holds
            if split == "train":
                assert not scene.pairs() & holdout
    prompts = (root / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 10
    assert all(not parse_caption(p).pairs() & holdout for p in prompts[:5])
    assert all(parse_caption(p).pairs() & holdout for p in prompts[5:])


def test_captions_are_read_by_the_caption_loader(tmp_path):
    from digit.data.captions import with_captions
    from digit.data.scenes import read_split
    from digit.data.sources import open_image_source

    write_scenes(tmp_path, ScenesConfig(n=6, n_classifier=2, n_test=2, n_prompts=1, seed=0))
    source, texts = with_captions(open_image_source(tmp_path / "train"))
    images, expected = read_split(tmp_path / "train")
    assert len(source) == 6 and texts == expected and images.shape == (6, 32, 32, 3)


def test_make_cli_and_its_refusals(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["scenes", "make", "--n", "4", "--n-classifier", "3", "--n-test", "2", "--n-prompts", "2"]
    assert main([*argv, "--holdout", "yellow-square", "--out", str(out)]) == 0
    assert json.loads((out / "scenes.json").read_text())["holdout"] == [["yellow", "square"]]
    assert main([*argv, "--holdout", "none", "--out", str(out)]) == 0  # its own output: replaced
    info = json.loads((out / "scenes.json").read_text())
    assert info["holdout"] == [] and len((out / "prompts.txt").read_text().splitlines()) == 2  # no unseen prompts
    capsys.readouterr()
    for bad, msg in ((["--holdout", "pink-circle"], "COLOR-SHAPE"), (["--size", "20"], "multiple of 8")):
        assert main([*argv, *bad, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert "digit scenes: error: " in err and msg in err and "Traceback" not in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    assert main([*argv, "--out", str(tmp_path / "other")]) == 2
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"

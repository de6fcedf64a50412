"""Prompt alignment: the metric against a direct computation, the attribute classifier, `digit scenes classifier /
alignment` and their refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from digit.cli import main
from digit.data.scenes import DEFAULT_HOLDOUT, Scene, SceneObject, ScenesConfig, write_scenes
from digit.errors import DigitError
from digit.evaluation.alignment import (
    SHAPE_CLASSES,
    ClassifierConfig,
    alignment_flags,
    alignment_summary,
    load_classifier,
    predict,
    prompts_targets,
    save_classifier,
    scene_targets,
    train_classifier,
)

RC, BS = SceneObject("circle", "red", "large"), SceneObject("square", "blue", "small")


def _direct(pred_scenes: list[Scene], prompt_scenes: list[Scene]) -> dict[str, list[bool]]:
    """The alignment rules written out per object, from scenes rather than arrays."""
    out = {k: [] for k in ("layout", "shape", "color", "size", "all")}
    for p, t in zip(pred_scenes, prompt_scenes):
        layout = all((a is None) == (b is None) for a, b in zip(p.slots(), t.slots()))
        checks = {}
        for attr in ("shape", "color", "size"):
            checks[attr] = all(a is not None and getattr(a, attr) == getattr(b, attr)
                               for a, b in zip(p.slots(), t.slots()) if b is not None)  # fmt: skip
        for k, v in {"layout": layout, **checks}.items():
            out[k].append(v)
        out["all"].append(layout and all(checks.values()))
    return out


def _as_pred(scenes: list[Scene]) -> np.ndarray:
    """Predictions as the classifier gives them: a colour and size in every slot, even an empty one."""
    p = scene_targets(scenes)
    p[..., 1:][p[..., 1:] < 0] = 3  # an empty slot still has some colour / size argmax
    return p


def test_metric_equals_a_direct_computation_on_hand_built_predictions():
    prompts = [Scene(RC, BS), Scene(RC, None), Scene(None, BS), Scene(BS, RC), Scene(RC, BS), Scene(RC, None)]
    preds = [
        Scene(RC, BS),  # all right
        Scene(RC, BS),  # an extra object: layout wrong, the prompted one right
        Scene(None, SceneObject("square", "red", "small")),  # colour wrong
        Scene(SceneObject("square", "blue", "large"), SceneObject("triangle", "red", "large")),  # size + shape wrong
        Scene(BS, RC),  # objects swapped: shape, colour and size all wrong, layout right
        Scene(None, RC),  # right object in the wrong half: layout wrong, and the prompted slot is empty
    ]
    flags = alignment_flags(_as_pred(preds), scene_targets(prompts))
    direct = _direct(preds, prompts)
    for k in direct:
        assert flags[k].tolist() == direct[k], k
    assert flags["all"].tolist() == [True, False, False, False, False, False]
    assert flags["layout"].tolist() == [True, False, True, True, True, False]
    assert flags["color"].tolist() == [True, True, False, True, False, False]

    unseen = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
    s = alignment_summary(_as_pred(preds), scene_targets(prompts), unseen)
    for group, sel in (("seen", ~unseen), ("unseen", unseen), ("all", np.ones(6, bool))):
        assert s[group]["n"] == int(sel.sum())
        for k in direct:
            assert s[group][k] == pytest.approx(np.mean(np.array(direct[k])[sel]))


def test_targets_groups_and_refusals():
    t = scene_targets([Scene(None, BS)])
    assert t.tolist() == [[[0, -1, -1], [SHAPE_CLASSES.index("square"), 2, 0]]]
    tgt, unseen = prompts_targets(["a large red triangle on the left", "a small red circle on the right"],
                                  set(DEFAULT_HOLDOUT))  # fmt: skip
    assert unseen.tolist() == [True, False] and tgt.shape == (2, 2, 3)
    s = alignment_summary(tgt, tgt, np.zeros(2, bool))
    assert s["unseen"] == {"n": 0} and s["seen"]["all"] == 1.0
    with pytest.raises(DigitError, match=r"must both be \[N, 2, 3\]"):
        alignment_flags(tgt[:1], tgt)
    with pytest.raises(DigitError, match="not a scenes caption"):
        prompts_targets(["a cat"], set())


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, ScenesConfig(n=8, n_classifier=64, n_test=200, n_prompts=4, seed=0))
    return root


def _easy_set(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """Renders of scenes whose objects are all large (every shape, colour and layout): an easy set."""
    from digit.data.scenes import random_scene, render_scene

    rng, scenes = np.random.default_rng(seed), []
    while len(scenes) < n:
        s = random_scene(rng, set(), "any")
        if all(o is None or o.size == "large" for o in s.slots()):
            scenes.append(s)
    return np.stack([render_scene(s, rng) for s in scenes]), scenes


@pytest.mark.converge
def test_classifier_learns_the_attributes(tmp_path):
    images, train_scenes = _easy_set(600, 0)
    cfg = ClassifierConfig(width=16, epochs=10, seed=0)
    net, losses = train_classifier(images, scene_targets(train_scenes), cfg)
    assert losses[-1] < 0.2 * losses[0]
    test_images, test_scenes = _easy_set(200, 1)
    unseen = np.array([bool(s.pairs() & set(DEFAULT_HOLDOUT)) for s in test_scenes])
    pred = predict(net, test_images)
    s = alignment_summary(pred, scene_targets(test_scenes), unseen)
    assert s["all"]["n"] == 200 and s["unseen"]["n"] > 20
    for k in ("layout", "shape", "color", "size", "all"):
        assert s["all"][k] >= 0.9, (k, s["all"])
    save_classifier(net, cfg, tmp_path, {"holdout": [], "test": s})
    loaded, rec = load_classifier(tmp_path)
    assert np.array_equal(predict(loaded, test_images), pred) and rec["config"] == cfg.to_dict()


def test_classifier_and_alignment_cli(scenes, tmp_path, capsys):
    clf = tmp_path / "clf"
    assert (
        main(["scenes", "classifier", "--data", str(scenes), "--epochs", "1", "--width", "8", "--out", str(clf)]) == 0
    )
    rec = json.loads((clf / "classifier.json").read_text())
    assert rec["holdout"] == sorted(list(p) for p in DEFAULT_HOLDOUT) and rec["test"]["all"]["n"] == 200
    capsys.readouterr()

    # a "generation": renders of the prompts (round-robin over 3 images per prompt)
    from digit.data.scenes import read_split

    images, texts = read_split(scenes / "classifier-test")
    prompts = texts[:4]
    gen = tmp_path / "gen"
    gen.mkdir()
    np.savez(gen / "samples.npz", images=images[[i % 4 for i in range(12)]], labels=np.full(12, -1))
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "a.json"
    assert main(["scenes", "alignment", "--classifier", str(clf), "--gen", str(gen), "--prompts",
                 str(tmp_path / "prompts.txt"), "--out", str(out)]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    net, _ = load_classifier(clf)
    tgt, unseen = prompts_targets([prompts[i % 4] for i in range(12)], set(DEFAULT_HOLDOUT))
    assert res["n"] == 12 and res["alignment"] == alignment_summary(predict(net, images[[i % 4 for i in range(12)]]),
                                                                    tgt, unseen)  # fmt: skip
    assert res["classifier"]["test"] == rec["test"]
    # the prompts recorded by `digit generate` in meta.json are used when --prompts is not given
    (gen / "meta.json").write_text(json.dumps({"prompts": [prompts[i % 4] for i in range(12)]}))
    assert main(["scenes", "alignment", "--classifier", str(clf), "--gen", str(gen)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res["alignment"]

    bad_prompts = tmp_path / "bad.txt"
    bad_prompts.write_text("a photo of a cat\n")
    np.savez(tmp_path / "small.npz", images=np.zeros((2, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 32, 32, 3), np.float32))
    (gen / "meta.json").write_text(json.dumps({"prompts": ["a small red circle on the left"]}))  # 1 for 12 images
    cases = [
        (["--gen", str(gen), "--prompts", str(bad_prompts)], "not a scenes caption"),
        (["--gen", str(tmp_path / "small.npz"), "--prompts", str(tmp_path / "prompts.txt")], "classifier reads 32px"),
        (["--gen", str(tmp_path / "float.npz"), "--prompts", str(tmp_path / "prompts.txt")], "must be uint8"),
        (["--gen", str(gen)], "pass --prompts FILE"),
        (["--gen", str(tmp_path / "prompts.txt"), "--prompts", str(tmp_path / "prompts.txt")], "not an .npz"),
    ]
    for extra, msg in cases:
        assert main(["scenes", "alignment", "--classifier", str(clf), *extra]) == 2
        err = capsys.readouterr().err
        assert "digit scenes: error:" in err and msg in err and "Traceback" not in err, (msg, err)
    assert main(["scenes", "alignment", "--classifier", str(scenes), "--gen", str(gen)]) == 2
    assert "classifier.json" in capsys.readouterr().err
    (clf / "model.safetensors").write_bytes(b"garbage")
    assert main(["scenes", "alignment", "--classifier", str(clf), "--gen", str(gen), "--prompts",
                 str(tmp_path / "prompts.txt")]) == 2  # fmt: skip
    assert "not this classifier's weights" in capsys.readouterr().err
    assert main(["scenes", "classifier", "--data", str(tmp_path), "--out", str(tmp_path / "c2")]) == 2
    assert "not a scenes dataset" in capsys.readouterr().err

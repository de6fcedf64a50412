"""`digit recipe scenes` at the tiny size: every step (scenes, offline text encoder, classifier, both tokenizers,
text-conditional GPTs, stage 2, samples by prompt with and without guidance, alignment) runs and is summarised."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")  # the offline text encoder (dev extra)

from digit.cli import main  # noqa: E402
from digit.recipes.scenes import CFG_SCALES, PIPELINES, SIZES, scenes_steps  # noqa: E402


def test_steps_share_sizes_and_never_flip():
    steps = {s.name: s.argv for s in scenes_steps("cpu")}
    # the two text-conditional GPTs differ only in their tokens and output
    a, b = steps["stage1"], steps["gpt-vq"]
    assert [x for x in a if x not in ("tokens", "stage1")] == [x for x in b if x not in ("vq-tokens", "gpt-vq")]
    assert "--text-cond" in a and "--steps" in a and a[a.index("--steps") + 1] == str(SIZES["cpu"].gpt_steps)
    assert all("--flip" not in argv for argv in steps.values())  # captions name left and right
    for scale in CFG_SCALES:
        for name in PIPELINES:
            argv = steps[f"samples-{name}-cfg{scale:g}"]
            assert argv[argv.index("--cfg-scale") + 1] == f"{scale:g}" and "data/prompts.txt" in argv
    assert any(s > 1 for s in CFG_SCALES) and 1.0 in CFG_SCALES


@pytest.mark.slow
def test_tiny_recipe_runs_every_step_and_summarises(tmp_path, capsys):
    out = tmp_path / "scenes"
    assert main(["recipe", "scenes", "--size", "tiny", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    n = SIZES["tiny"].n_prompts * SIZES["tiny"].per_prompt
    assert sorted(s["alignment"]) == sorted(f"{p}-cfg{c:g}" for p in PIPELINES for c in CFG_SCALES)
    for row in s["alignment"].values():
        assert row["seen"]["n"] == n and row["unseen"]["n"] == n
        assert all(0.0 <= row["all"][k] <= 1.0 for k in ("layout", "shape", "color", "size", "all"))
    assert s["classifier_test"]["all"]["n"] == SIZES["tiny"].n_test
    assert set(s["wall_s"]) == {st.name for st in scenes_steps("tiny")}
    md = (out / "summary.md").read_text()
    assert "| discriminative | 3 | held-out pairs |" in md and "| real renders (classifier test) |" in md
    assert "samples.png: rows digit-cfg1, digit-cfg3, vq-cfg1, vq-cfg3" in md
    from PIL import Image

    with Image.open(out / "samples.png") as im:  # 4 rows x 4 columns (2 seen + 2 unseen prompts) of 64 px
        assert im.size[0] > 4 * 64 and im.size[1] > 4 * 64
    meta = json.loads((out / "samples-digit-cfg3" / "meta.json").read_text())
    prompts = (out / "data" / "prompts.txt").read_text().splitlines()
    assert meta["prompts"] == [prompts[i % len(prompts)] for i in range(2 * n)]
    capsys.readouterr()
    assert main(["recipe", "scenes", "--size", "tiny", "--out", str(out)]) == 0  # everything done: all skipped
    assert capsys.readouterr().out.count("(done, skipped)") == len(scenes_steps("tiny"))


def test_dry_run_and_refusal(tmp_path, capsys):
    assert main(["recipe", "scenes", "--size", "tiny", "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "$ digit text-encoder build --captions data/train" in text and "--encoder-weights auto" in text
    assert not (tmp_path / "r").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert main(["recipe", "scenes", "--size", "tiny", "--out", str(tmp_path / "mine")]) == 2
    assert "not a digit recipe directory" in capsys.readouterr().err

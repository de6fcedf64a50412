"""The CIFAR-10 recipe (split, runner, every step at the tiny size), shipping its models, and `digit demo`."""

from __future__ import annotations

import json
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_image_folder
from digit.cli import main
from digit.data.split import split_folders
from digit.errors import DigitError
from digit.recipes.runner import Step, run_steps

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------ split


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    data = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), n_per_class=6, size=(32, 32))
    s = split_folders(data, tmp_path / "s0", val_count=4, seed=0)
    assert (s["train"], s["val"], s["used"]) == (14, 4, 18)
    train, val = _files(tmp_path / "s0" / "train"), _files(tmp_path / "s0" / "val")
    assert len(train) == 14 and len(val) == 4 and not train & val
    assert train | val == _files(data)
    # same seed: same split; another seed: another split; bytes are copied unchanged
    split_folders(data, tmp_path / "s0b", val_count=4, seed=0)
    assert _files(tmp_path / "s0b" / "val") == val
    split_folders(data, tmp_path / "s1", val_count=4, seed=1)
    assert _files(tmp_path / "s1" / "val") != val
    some = sorted(val)[0]
    assert (tmp_path / "s0" / "val" / some).read_bytes() == (data / some).read_bytes()


def test_split_limit_and_refusals(tmp_path):
    data = write_image_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=10, size=(32, 32))
    s = split_folders(data, tmp_path / "s", val_count=3, seed=0, limit=8)
    assert (s["train"], s["val"]) == (5, 3)
    assert len(_files(tmp_path / "s" / "train")) == 5 and len(_files(tmp_path / "s" / "val")) == 3
    with pytest.raises(DigitError, match="validation count"):
        split_folders(data, tmp_path / "t", val_count=8, seed=0, limit=8)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    Image.new("RGB", (8, 8)).save(flat / "y.png")
    with pytest.raises(DigitError, match="no class folders"):
        split_folders(flat, tmp_path / "u", val_count=1)


# ------------------------------------------------------------------------------------------------ runner


def _fake_python(tmp_path: Path, fail_on: str) -> Path:
    """A stand-in interpreter: logs its arguments, fails when they contain ``fail_on``."""
    log = tmp_path / "calls.log"
    script = tmp_path / "fakepy"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncase "$*" in *{fail_on}*) exit 3;; esac\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_runner_skips_finished_steps_resumes_training_and_keeps_work_on_failure(tmp_path):
    root = tmp_path / "r"
    calls = []
    steps = [
        Step("prep", [], call=lambda r: calls.append(r) or {"n": 1}, what="in process"),
        Step("fit", ["train", "--out", "run"], out="run", resumable=True, what="a trainer"),
        Step("boom", ["eval", "--boom"], out="x.json", what="fails"),
    ]
    py = _fake_python(tmp_path, "--boom")
    with pytest.raises(DigitError, match="step boom failed \\(exit 3\\)"):
        run_steps(steps, root, python=str(py), log=lambda m: None)
    log = (tmp_path / "calls.log").read_text().splitlines()
    assert log == ["-m digit train --out run", "-m digit eval --boom"]
    assert len(calls) == 1
    assert (root / ".recipe" / "prep.json").is_file() and (root / ".recipe" / "fit.json").is_file()
    assert not (root / ".recipe" / "boom.json").exists()
    # again: finished steps are skipped; a trainer with a checkpoint continues with --resume; a partial output of a
    # non-resumable step is removed first
    (root / ".recipe" / "fit.json").unlink()
    (root / "run").mkdir()
    (root / "run" / "train_state.pt").write_bytes(b"")
    (root / "x.json").write_text("half")
    (tmp_path / "calls.log").unlink()
    py = _fake_python(tmp_path, "--never")
    results = run_steps(steps, root, python=str(py), log=lambda m: None)
    assert (tmp_path / "calls.log").read_text().splitlines() == [
        "-m digit train --out run --resume",
        "-m digit eval --boom",
    ]
    assert not (root / "x.json").exists()
    assert [r.skipped for r in results] == [True, False, False] and len(calls) == 1
    assert results[0].info == {"n": 1}


def test_a_resumed_trainer_records_its_wall_time_over_every_run(tmp_path):
    root = tmp_path / "r"
    steps = [Step("fit", ["train", "--out", "run"], out="run", resumable=True, what="a trainer")]
    with pytest.raises(DigitError, match="step fit failed"):
        run_steps(steps, root, python=str(_fake_python(tmp_path, "train")), log=lambda m: None)
    partial = root / ".recipe" / "fit.partial.json"
    first = json.loads(partial.read_text())["wall_s"]
    assert first >= 0 and not (root / ".recipe" / "fit.json").exists()
    partial.write_text(json.dumps({"wall_s": 600.0}))  # as if the first run had trained for 10 minutes
    (root / "run").mkdir()
    (root / "run" / "train_state.pt").write_bytes(b"")
    messages = []
    (res,) = run_steps(steps, root, python=str(_fake_python(tmp_path, "--never")), log=messages.append)
    rec = json.loads((root / ".recipe" / "fit.json").read_text())
    assert 600.0 <= rec["wall_s"] < 660.0 and res.wall_s == pytest.approx(rec["wall_s"], abs=0.1)
    assert not partial.exists() and any("10.0 of them in earlier runs" in m for m in messages)
    # restarted from scratch (no checkpoint): an earlier run's time does not count
    (root / ".recipe" / "fit.json").unlink()
    partial.write_text(json.dumps({"wall_s": 600.0}))
    (root / "run" / "train_state.pt").unlink()
    run_steps(steps, root, python=str(_fake_python(tmp_path, "--never")), log=lambda m: None)
    assert json.loads((root / ".recipe" / "fit.json").read_text())["wall_s"] < 60.0 and not partial.exists()


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    data = write_image_folder(root / "imgs", classes=CLASSES, n_per_class=4, size=(32, 32))
    out = root / "run"
    assert (
        main(["recipe", "cifar10", "--data", str(data), "--size", "tiny", "--seeds", "0", "1", "--out", str(out)]) == 0
    )
    return out


TINY_STEPS = 10 + 6 + 2 * 11  # shared; the dino route; per seed: VQ-token GPT + 5, stage 1 + stage 2 + 4


def test_tiny_recipe_runs_every_step_for_two_seeds_and_summarises(tiny_recipe, capsys):
    import torch

    from digit.utils.artifacts import load_safetensors

    s = json.loads((tiny_recipe / "summary.json").read_text())
    assert len(s["steps"]) == TINY_STEPS and all(st["wall_s"] >= 0 for st in s["steps"])
    runs = s["routes"]["dino"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for run in runs:
        assert 0 <= run["encoder_knn_top1"] <= 1
        for k in ("digit", "vq"):
            rates = run["stability_change_rate"][k]
            assert set(rates) == {"30", "20", "10"} and all(0 <= v <= 1 for v in rates.values())
            assert np.isfinite(run["fid"][k]) and run["fid"][k] >= 0 and np.isfinite(run["fd"][k]) and run["fd"][k] >= 0
            assert 0 <= run["probe_best_top1"][k] <= 1
    # seeds are distinct runs: other weights, other samples; the shared side (split, VQ, statistics) is one
    w0, w1 = (load_safetensors(tiny_recipe / f"seed{i}" / "gpt-vq" / "model.safetensors") for i in (0, 1))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    s0, s1 = (np.load(tiny_recipe / "dino" / f"seed{i}" / "samples" / "samples.npz")["images"] for i in (0, 1))
    assert s0.shape == s1.shape == (10, 32, 32, 3) and not np.array_equal(s0, s1)
    assert [st["name"] for st in s["steps"]].count("vq") == 1 and runs[0]["fid"]["floor"] == runs[1]["fid"]["floor"]
    stats = json.loads((tiny_recipe / "seed1" / "fid-vq.json").read_text())["provenance"]["reference"]
    assert (
        stats["kind"] == "stats"
        and stats["count"] == 20
        and stats["feature_extractor"]["name"] == "inception-v3-compat"
    )
    agg = s["routes"]["dino"]["aggregate"]["fid.digit"]
    assert agg["n"] == 2 and agg["mean"] == pytest.approx((runs[0]["fid"]["digit"] + runs[1]["fid"]["digit"]) / 2)
    assert set(s["routes"]["dino"]["verdicts"]) == {
        "stability",
        "generation (FID)",
        "generation (FD, Lite1)",
        "generation",
        "understanding",
    }
    md = (tiny_recipe / "summary.md").read_text()
    assert "| stability | token change rate at SNR 30 dB" in md and "| understanding |" in md and "seed 1" in md
    # a second run finds everything done and only re-summarises
    capsys.readouterr()
    data = json.loads((tiny_recipe / "data" / "split.json").read_text())["source"]
    assert (
        main(["recipe", "cifar10", "--data", data, "--size", "tiny", "--seeds", "0", "1", "--out", str(tiny_recipe)])
        == 0
    )
    assert capsys.readouterr().out.count("(done, skipped)") == TINY_STEPS


def test_ship_is_self_contained_and_the_demo_runs_on_it(tiny_recipe, tmp_path):
    from digit.tokenizers import load_tokenizer

    shipped = tmp_path / "models"
    assert main(["recipe", "ship", "--recipe", str(tiny_recipe), "--seed", "1", "--out", str(shipped)]) == 0
    manifest = json.loads((shipped / "models.json").read_text())
    import hashlib

    for rel, digest in manifest["sha256"].items():
        assert hashlib.sha256((shipped / rel).read_bytes()).hexdigest() == digest
    val_classes = [d for d in (tiny_recipe / "data" / "val").iterdir() if any(d.iterdir())]
    n_images = len(list((shipped / "images").glob("*.png")))
    assert n_images == len(val_classes) > 0  # one validation image per class present in the split
    assert not any(p.name in ("train_state.pt", "metrics.jsonl") for p in shipped.rglob("*"))
    # the tokenizer no longer needs the recipe's encoder directory: same tokens without it
    x = np.stack([np.asarray(Image.open(p)) for p in sorted((shipped / "images").glob("*.png"))])
    import torch

    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    before = load_tokenizer(tiny_recipe / "dino" / "tokenizer").encode(xt)
    moved = tmp_path / "elsewhere"
    shutil.move(str(tiny_recipe / "dino" / "encoder"), moved)
    try:
        assert torch.equal(load_tokenizer(shipped / "tokenizer").encode(xt), before)
    finally:
        shutil.move(str(moved), tiny_recipe / "dino" / "encoder")
    assert (shipped / "stage1" / "model.safetensors").read_bytes() == (
        tiny_recipe / "dino" / "seed1" / "stage1" / "model.safetensors"
    ).read_bytes()
    assert manifest["route"] == "dino" and manifest["seed"] == 1 and manifest["figures"]["fd_space"]
    # the claims table travels with the models: the recipe's summary over both seeds, not the shipped seed alone
    from digit.recipes.report import claims_rows

    summarised = json.loads((tiny_recipe / "summary.json").read_text())["routes"]["dino"]
    claims = claims_rows(summarised["runs"], summarised["aggregate"], summarised["verdicts"])
    assert manifest["claims"] == claims and manifest["claims_seeds"] == [0, 1]
    knn = json.loads((tiny_recipe / "dino" / "knn.json").read_text())["knn_top1"]
    assert claims[0] == {"claim": "(context)", "measure": "encoder: kNN top-1 on val of the mean-pooled tokenizer "
                         "features", "digit": f"{knn:.2%}", "vq": "", "verdict": "-"}  # fmt: skip
    assert [r["claim"] for r in claims[1:4]] == ["stability"] * 3
    assert " ± " in next(r for r in claims if r["claim"] == "generation (FD, Lite1)")["digit"]
    # a summary that does not include the shipped seed (made before it was trained) is not used for it
    from digit.recipes.report import collect_run
    from digit.recipes.ship import _claims

    stale = {"routes": {"dino": {**summarised, "runs": [r for r in summarised["runs"] if r["seed"] == 0]}}}
    rows, seeds = _claims(stale, collect_run(tiny_recipe, "dino", 1), "dino")
    assert seeds == [1] and " ± " not in next(r for r in rows if r["claim"] == "generation (FD, Lite1)")["digit"]

    out = tmp_path / "demo"
    assert main(["demo", "--models", str(shipped), "--out", str(out), "--per-class", "2"]) == 0
    samples = np.asarray(Image.open(out / "samples.png"))
    work = np.asarray(Image.open(out / "tokenizer.png"))
    # 10 class rows of 64 px tiles (+ 4 px padding); one row of 96 px tiles per image under a 14 px header, 4 columns
    assert samples.shape[0] == 10 * 68 + 4 and samples.shape[1] == 84 + 2 * 68 + 4
    assert work.shape[0] == 14 + n_images * 100 + 4 and work.shape[1] == 84 + 4 * 100 + 4
    report = (out / "report.md").read_text()
    assert "samples.png" in report and "tokenizer.png" in report and "shipped CIFAR-10 reference models" in report
    assert manifest["figures"]["tokenizer_knn_top1"] == knn and f"tokenizer-feature kNN top-1 {knn:.2%}" in report
    # the claims table is shown beside the samples: in the report, on the terminal, side by side in the HTML
    row = claims[1]
    line = f"| {row['claim']} | {row['measure']} | {row['digit']} | {row['vq']} | {row['verdict']} |"
    assert "## The paper's claims, measured on these models' recipe" in report and line in report
    assert "GPT seeds 0, 1, mean ± std" in report
    page = (out / "report.html").read_text()
    beside = page[page.index("<div class='beside'>") :]
    assert beside.index('<img src="samples.png"') < beside.index("<table>") < beside.index("</div>")
    assert page.count("<tr>") == len(claims) + 1 and f"<td>{row['measure']}</td>" in page


def test_demo_trains_small_models_when_none_are_shipped(tmp_path, monkeypatch, capsys):
    import digit.demo

    monkeypatch.setattr(digit.demo, "shipped_models", lambda: tmp_path / "not-installed")
    data = write_image_folder(tmp_path / "imgs", classes=CLASSES[:4], n_per_class=7, size=(32, 32))
    report = digit.demo.run_demo(tmp_path / "demo", data=str(data), per_class=1, fallback_size="tiny")
    out = capsys.readouterr().out
    assert "not in" in out and "running the CIFAR-10 recipe at its small size instead" in out
    text = report.read_text()
    assert "trained just now by the small CIFAR-10 recipe" in text
    assert "The paper's claims" not in text and "<table>" not in (tmp_path / "demo" / "report.html").read_text()
    assert (tmp_path / "demo" / "models" / "models.json").is_file()
    assert np.asarray(Image.open(tmp_path / "demo" / "samples.png")).shape[0] == 4 * 68 + 4


def test_demo_runs_on_the_shipped_reference_models(tmp_path):
    import hashlib

    from digit.demo import models_complete, shipped_models

    folder = shipped_models()
    assert models_complete(folder), f"the reference models belong in the repository at {folder}"
    manifest = json.loads((folder / "models.json").read_text())
    for rel, digest in manifest["sha256"].items():
        f = folder / rel
        assert f.stat().st_size < 16 * 2**20 and hashlib.sha256(f.read_bytes()).hexdigest() == digest
    assert manifest["recipe_size"] == "cpu"
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--per-class", "1"]) == 0
    report = (out / "report.md").read_text()
    assert "the shipped CIFAR-10 reference models" in report
    assert manifest["route"] == "distill" and manifest["figures"]["encoder_knn_top1"] is None  # no kNN in training
    knn = manifest["figures"]["tokenizer_knn_top1"]
    assert knn > 0.6 and f"tokenizer-feature kNN top-1 {knn:.2%}" in report  # section 2's aim, on the val split
    assert "8x8 grid of discriminative tokens" in report
    stab = next(r for r in manifest["claims"] if r["claim"] == "stability")
    assert stab["verdict"] == "not reproduced" and float(stab["digit"]) > float(stab["vq"])
    assert f"| stability | {stab['measure']} | {stab['digit']} | {stab['vq']} | not reproduced |" in report
    samples = np.asarray(Image.open(out / "samples.png"))
    assert samples.shape == (10 * 68 + 4, 84 + 68 + 4, 3) and samples.std() > 10  # real images, not a blank grid


def test_demo_refuses_a_folder_that_is_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert main(["demo", "--models", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a demo model folder" in capsys.readouterr().err


def test_token_colors_follow_the_codebook_geometry():
    from digit.demo import token_colors

    rng = np.random.default_rng(0)
    c = rng.normal(size=(6, 16)).astype(np.float32)
    c[1] = c[0] + 1e-3  # near-identical features -> near-identical colours
    col = token_colors(c).astype(int)
    assert col.shape == (6, 3) and col.min() >= 0 and col.max() <= 255
    assert np.abs(col[0] - col[1]).max() <= 2
    assert max(np.abs(col[0] - col[j]).max() for j in range(2, 6)) > 30


def test_recipe_cli_refuses_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["recipe", "cifar10", "--data", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path / "o")])
    assert main(["recipe", "cifar10", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("$ digit ") == 8 + 6 + 11 and "encoder pretrain" in printed  # shared, dino, seed 0
    (tmp_path / "r").mkdir()
    assert main(["recipe", "ship", "--recipe", str(tmp_path / "r"), "--out", str(tmp_path / "m")]) == 2
    assert "not a finished recipe directory" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

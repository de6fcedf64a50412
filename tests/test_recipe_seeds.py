"""The multi-seed, multi-route CIFAR-10 recipe: which commands each route and seed runs, what is shared and done once,
the FID reference statistics' cache key, and the report's mean / spread / verdicts against direct computations."""

from __future__ import annotations

import json
import stat
import statistics
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image_folder
from digit.errors import DigitError
from digit.recipes.cifar10 import EFFNET, STUDENT, RecipePlan, cifar10_steps, training_steps
from digit.recipes.fidsteps import REF_DIR, link_reference_subset
from digit.recipes.report import aggregate, generation_verdict, seeded_verdict, spread, summarise, write_summary
from digit.recipes.runner import Step, finished_steps, run_steps

SHARED = {"split", "vq", "vq-tokens-train", "vq-tokens-val", "stability-vq.json", REF_DIR, "fid/ref-fid.npz",
          "fid/ref-fd.npz", "fid/fid-floor.json", "fid/fd-floor.json"}  # fmt: skip


def _by_name(plan: RecipePlan) -> dict[str, Step]:
    steps = cifar10_steps(plan)
    names = [s.name for s in steps]
    assert len(names) == len(set(names)), "step names (and so their markers) must be unique"
    return {s.name: s for s in steps}


def _opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _strip_io(argv: list[str]) -> list[str]:
    """A training command without its data and output paths."""
    io = {"--tokens", "--val-tokens", "--out"}
    return [x for i, x in enumerate(argv) if x not in io and (i == 0 or argv[i - 1] not in io)]


# ------------------------------------------------------------------------------------------------ commands


def test_routes_produce_their_encoder_and_tokenizer_commands():
    steps = _by_name(RecipePlan("/d", routes=("dino", "effnet"), seeds=(0,)))
    dino_fit, eff_fit = steps["dino/tokenizer"].argv, steps["effnet/tokenizer"].argv
    assert steps["dino/encoder"].argv[:2] == ["encoder", "pretrain"] and _opt(dino_fit, "--encoder") == "dino/encoder"
    assert "effnet/encoder" not in steps  # nothing to train: the packaged ImageNet weights
    assert _opt(eff_fit, "--encoder") == EFFNET and _opt(eff_fit, "--encoder-weights") == "auto"
    assert _opt(eff_fit, "--layer") == "stride16" and _opt(eff_fit, "--image-size") == "128"  # 128 / 16 = 8x8 grid
    for r in ("dino", "effnet"):
        assert _opt(steps[f"{r}/tokens-train"].argv, "--tokenizer") == f"{r}/tokenizer"
        assert _opt(steps[f"{r}/seed0/stage1"].argv, "--tokens") == f"{r}/tokens-train"
        assert _opt(steps[f"{r}/seed0/stage2"].argv, "--prefix-tokens") == f"{r}/tokens-train"
        assert _opt(steps[f"{r}/seed0/samples"].argv, "--decoder") == f"{r}/seed0/stage2"
        assert _opt(steps[f"{r}/stability.json"].argv, "--tokenizer") == f"{r}/tokenizer"
        knn = steps[f"{r}/knn.json"].argv  # one kNN protocol for every route, on the whole val split
        assert knn[:2] == ["tokenizer", "knn"] and _opt(knn, "--tokenizer") == f"{r}/tokenizer"
        assert _opt(knn, "--bank") == "10000" and _opt(knn, "--data") == "data/val"
    distill = _by_name(RecipePlan("/d", routes=("distill",), seeds=(0,)))
    enc = distill["distill/encoder"]
    assert enc.resumable and enc.argv[:2] == ["encoder", "pretrain"] and _opt(enc.argv, "--out") == "distill/encoder"
    assert _opt(enc.argv, "--teacher") == EFFNET and _opt(enc.argv, "--teacher-weights") == "auto"
    assert _opt(enc.argv, "--image-size") == "32" and _opt(enc.argv, "--teacher-size") == "128"  # both 8x8 grids
    # the student of results/encoders.md's best run (192 wide), not the DINO route's 128-wide ViT
    assert json.loads(_opt(enc.argv, "--encoder-kwargs")) == STUDENT and STUDENT["embed_dim"] == 192
    assert _opt(enc.argv, "--encoder-kwargs") != _opt(steps["dino/encoder"].argv, "--encoder-kwargs")
    assert _opt(enc.argv, "--student-precision") == "bf16" and _opt(enc.argv, "--weight-decay-end") == "0.05"
    assert "--val" not in enc.argv  # no kNN monitor under --teacher
    fit = distill["distill/tokenizer"].argv
    assert _opt(fit, "--encoder") == "distill/encoder" and _opt(fit, "--layer") == "1"
    assert _opt(fit, "--smooth") == "3" and "--smooth" not in dino_fit and "--smooth" not in eff_fit
    only_effnet = _by_name(RecipePlan("/d", routes=("effnet",), seeds=(0,)))
    assert not any(n.startswith("dino/") for n in only_effnet)
    with pytest.raises(ValueError, match="unknown route"):
        cifar10_steps(RecipePlan("/d", routes=("nope",)))


def test_seeds_get_distinct_runs_and_equal_gpt_budgets():
    plan = RecipePlan("/d", size="cpu", routes=("dino", "effnet"), seeds=(0, 1, 2))
    steps = _by_name(plan)
    shared = [n for n in steps if not n.startswith(("seed", "dino/", "effnet/"))]
    assert set(shared) == SHARED  # once, whatever the routes and seeds
    for seed in (0, 1, 2):
        vq, st1, st2 = (
            steps[f"seed{seed}/gpt-vq"].argv,
            steps[f"dino/seed{seed}/stage1"].argv,
            steps[f"dino/seed{seed}/stage2"].argv,
        )
        for argv, out in (
            (vq, f"seed{seed}/gpt-vq"),
            (st1, f"dino/seed{seed}/stage1"),
            (st2, f"dino/seed{seed}/stage2"),
        ):
            assert _opt(argv, "--seed") == str(seed) and _opt(argv, "--out") == out
        assert _opt(steps[f"seed{seed}/samples-vq"].argv, "--seed") == str(seed)
        # the comparison: same model, steps, batch, schedule for both token types (only data and output differ)
        assert _strip_io(st1) == _strip_io(vq)
        assert _opt(st1, "--steps") == _opt(st2, "--steps") == "1500" and _opt(st1, "--batch-size") == "128"
        for tag, prefix in (("digit", f"dino/seed{seed}"), ("vq", f"seed{seed}")):
            fid, fd = steps[f"{prefix}/fid-{tag}.json"].argv, steps[f"{prefix}/fd-{tag}.json"].argv
            assert _opt(fid, "--features") == "inception" and _opt(fid, "--ref") == "fid/ref-fid.npz"
            assert _opt(fd, "--features") == "tf_efficientnet_lite1" and _opt(fd, "--ref") == "fid/ref-fd.npz"
            assert _opt(fid, "--min-images") == "10000"
    assert _opt(steps["seed1/samples-vq"].argv, "-n") == "10000"
    assert _opt(steps["fid/ref-fid.npz"].argv, "--ref") == REF_DIR
    demo = [s.name for s in training_steps(RecipePlan("/d", size="small", seeds=(3,)))]
    assert demo == ["split", "vq", "vq-tokens-train", "vq-tokens-val", "dino/encoder", "dino/tokenizer",
                    "dino/tokens-train", "dino/tokens-val", "dino/seed3/stage1", "dino/seed3/stage2"]  # fmt: skip


def test_a_seed_trains_every_gpt_before_it_samples_and_seeds_do_not_interleave():
    plan = RecipePlan("/d", size="cpu", routes=("dino", "effnet"), seeds=(0, 1))
    names = [s.name for s in cifar10_steps(plan)]
    for seed in (0, 1):
        own = [n for n in names if n.startswith((f"seed{seed}/", f"dino/seed{seed}/", f"effnet/seed{seed}/"))]
        trained = [f"seed{seed}/gpt-vq"] + [
            f"{r}/seed{seed}/{st}" for r in ("dino", "effnet") for st in ("stage1", "stage2")
        ]
        assert own[:5] == trained  # the shippable models first, then the hour of sampling and scoring
        assert {f"seed{seed}/samples-vq", f"dino/seed{seed}/samples", f"effnet/seed{seed}/probe.json"} <= set(own[5:])
        span = [names.index(n) for n in own]
        assert span == list(range(span[0], span[0] + len(own)))  # one seed's steps are contiguous
    assert names.index("effnet/seed0/probe.json") < names.index("seed1/gpt-vq")


def test_reference_subset_is_seeded_and_complete_when_asked(tmp_path):
    train = write_image_folder(tmp_path / "train", classes=("a", "b"), n_per_class=10, size=(32, 32))
    info = link_reference_subset(train, tmp_path / "r1", 7, seed=0)
    files = sorted(p.relative_to(tmp_path / "r1") for p in (tmp_path / "r1").rglob("*") if p.is_file())
    assert info == {"images": 7, "of": 20, "seed": 0} and len(files) == 7
    assert all((train / f).read_bytes() == (tmp_path / "r1" / f).read_bytes() for f in files)
    link_reference_subset(train, tmp_path / "r2", 7, seed=0)
    assert sorted(p.relative_to(tmp_path / "r2") for p in (tmp_path / "r2").rglob("*") if p.is_file()) == files
    link_reference_subset(train, tmp_path / "r1", 7, seed=1)  # rebuilt in place: another subset, nothing left over
    other = sorted(p.relative_to(tmp_path / "r1") for p in (tmp_path / "r1").rglob("*") if p.is_file())
    assert len(other) == 7 and other != files
    assert link_reference_subset(train, tmp_path / "all", 0, seed=0)["images"] == 20


# ------------------------------------------------------------------------------------------------ shared steps, cache


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in interpreter that logs each `digit` command instead of running it."""
    log = tmp_path / "calls.log"
    script = tmp_path / "fakepy"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, log


def _outs(log: Path) -> list[str]:
    """The --out of every command logged since the last call (then the log is cleared)."""
    if not log.is_file():
        return []
    lines = log.read_text().splitlines()
    log.unlink()
    return [line.split("--out ")[1].split()[0] for line in lines]


def test_shared_steps_run_once_and_the_reference_key_invalidates_only_the_scores(tmp_path):
    data = write_image_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=20, size=(32, 32))
    py, log = _fake_python(tmp_path)
    root = tmp_path / "run"
    run = lambda plan: run_steps(cifar10_steps(plan), root, python=str(py), log=lambda m: None)  # noqa: E731
    base = RecipePlan(str(data), size="tiny", routes=("dino",), seeds=(0, 1))
    run(base)
    first = _outs(log)
    assert first.count("vq") == 1 and first.count("fid/ref-fid.npz") == 1 and first.count("fid/ref-fd.npz") == 1
    assert {"seed0/gpt-vq", "seed1/gpt-vq", "dino/seed0/stage1", "dino/seed1/stage1"} <= set(first)
    assert len(list((root / REF_DIR).rglob("*.png"))) == 20  # tiny: 20 reference images of the 30 training images
    # the same plan again: everything skipped
    run(base)
    assert _outs(log) == []
    # a third seed and a second route: only their own steps run; the shared side and the first seeds are reused
    run(RecipePlan(str(data), size="tiny", routes=("dino", "effnet"), seeds=(0, 1, 2)))
    added = _outs(log)
    assert not SHARED & set(added) and "dino/encoder" not in added and "seed0/gpt-vq" not in added
    assert {
        "seed2/gpt-vq",
        "dino/seed2/stage1",
        "effnet/tokenizer",
        "effnet/seed0/stage1",
        "effnet/seed2/stage2",
    } <= set(added)
    # another reference set (--fid-ref): the statistics and every score are recomputed, nothing trained again
    run(RecipePlan(str(data), size="tiny", routes=("dino", "effnet"), seeds=(0, 1, 2), fid_ref=12))
    redone = _outs(log)
    scores = {n for n in redone if Path(n).name.startswith(("fid-", "fd-"))}
    assert set(redone) == {"fid/ref-fid.npz", "fid/ref-fd.npz"} | scores
    assert (
        len(scores) == 2 + 2 * 3 + 2 * 3 * 2
    )  # floor; VQ pipeline per seed; each route's pipeline per seed (x FID, FD)
    assert len(list((root / REF_DIR).rglob("*.png"))) == 12
    run(RecipePlan(str(data), size="tiny", routes=("dino", "effnet"), seeds=(0, 1, 2), fid_ref=12))
    assert _outs(log) == []


def test_summary_only_reports_the_finished_seeds_and_runs_nothing(tmp_path, capsys):
    from digit.cli import main

    data = write_image_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=20, size=(32, 32))
    py, log = _fake_python(tmp_path)
    root = tmp_path / "run"
    run_steps(cifar10_steps(RecipePlan(str(data), size="tiny", routes=("dino",), seeds=(0,))), root, python=str(py),
              log=lambda m: None)  # fmt: skip
    _outs(log)
    _hand_built_recipe(root, {0: FIGS[0], 1: FIGS[1]})  # seed 1 has figures on disk but only one finished step
    (root / ".recipe" / "seed1").mkdir(parents=True, exist_ok=True)
    (root / ".recipe" / "seed1" / "gpt-vq.json").write_text(json.dumps({"command": "digit train", "wall_s": 5.0}))
    argv = ["recipe", "cifar10", "--data", str(data), "--out", str(root), "--size", "tiny", "--encoder", "dino"]
    assert main([*argv, "--seeds", "0", "1", "--summary-only"]) == 0
    assert _outs(log) == []  # nothing ran
    assert "summarised seed(s) 0; not finished yet: 1" in capsys.readouterr().out
    summary = json.loads((root / "summary.json").read_text())
    runs = summary["routes"]["dino"]["runs"]
    assert [r["seed"] for r in runs] == [0] and runs[0]["fid"]["digit"] == FIGS[0]["fid_d"]
    names = [s["name"] for s in summary["steps"]]
    assert summary["size"] == "tiny" and "seed0/gpt-vq" in names and "vq" in names
    assert not [n for n in names if n.startswith(("seed1/", "dino/seed1/"))]  # an unfinished seed's steps are left out
    # scores computed from another reference set do not count as finished: no seed is complete
    assert main([*argv, "--seeds", "0", "--fid-ref", "12", "--summary-only"]) == 2
    assert "no seed has finished every step" in capsys.readouterr().err
    assert main([*argv[:5], str(tmp_path / "imgs"), *argv[6:], "--summary-only"]) == 2
    assert "is not a digit recipe directory" in capsys.readouterr().err


def test_runner_redoes_a_step_whose_key_changed_and_restarts_a_stale_trainer(tmp_path):
    py, log = _fake_python(tmp_path)
    root = tmp_path / "r"
    (root / "run").mkdir(parents=True)
    (root / "run" / "train_state.pt").write_bytes(b"")

    def steps(key):
        return [Step("fit", ["train", "--out", "run"], out="run", resumable=True, key=key)]

    run_steps(steps("a"), root, python=str(py), log=lambda m: None)
    assert log.read_text().splitlines() == ["-m digit train --out run --resume"]  # an interrupted run continues
    log.unlink()
    (root / "run" / "train_state.pt").write_bytes(b"")
    run_steps(steps("b"), root, python=str(py), log=lambda m: None)
    # computed from something else: never resumed, its old output removed first
    assert log.read_text().splitlines() == ["-m digit train --out run"] and not (root / "run").exists()
    assert json.loads((root / ".recipe" / "fit.json").read_text())["key"] == "b"


def test_runner_redoes_what_depends_on_a_changed_or_redone_step_and_nothing_else(tmp_path):
    py, log = _fake_python(tmp_path)
    root = tmp_path / "r"

    def steps(lr="1e-3", n="8"):
        return [
            Step("fit", ["train", "--lr", lr, "--out", "run"], out="run", resumable=True),
            Step("gen", ["generate", "--stage1", "run", "--n", n, "--out", "samples"], out="samples"),
            Step("score", ["eval", "--gen", "samples/png", "--out", "fid.json"], out="fid.json"),
            # "runner/png" starts with "run" but is not inside it: no dependency
            Step("other", ["eval", "--gen", "runner/png", "--out", "other.json"], out="other.json"),
            Step("ref", [], call=lambda r: {}, inputs=("run/config.json",), what="reads run in process"),
        ]

    run = lambda s: run_steps(s, root, python=str(py), log=lambda m: None)  # noqa: E731
    run(steps())
    assert _outs(log) == ["run", "samples", "fid.json", "other.json"]
    run(steps())
    assert _outs(log) == []  # unchanged: all skipped
    finished = lambda s: [r.name for r in finished_steps(s, root)]  # noqa: E731
    # a changed command redoes the step and what reads its output, transitively
    assert finished(steps(n="16")) == ["fit", "other", "ref"]
    run(steps(n="16"))
    assert _outs(log) == ["samples", "fid.json"]
    # a step redone with the same command (its marker removed) redoes its dependants too, the in-process one included
    (root / ".recipe" / "fit.json").unlink()
    messages = []
    run_steps(steps(n="16"), root, python=str(py), log=messages.append)
    assert _outs(log) == ["run", "samples", "fid.json"]
    assert any("ref: reads run in process: its command, or a step it depends on, changed" in m for m in messages)
    run(steps(n="16"))
    assert _outs(log) == []
    # markers written before fingerprints existed are judged by their key alone: an old run is not redone
    for m in (root / ".recipe").glob("*.json"):
        rec = json.loads(m.read_text())
        del rec["inputs"]
        m.write_text(json.dumps(rec))
    run(steps(lr="3e-4"))
    assert _outs(log) == []
    assert len(finished(steps(lr="3e-4"))) == 5
    # ... but what reads a step redone now is redone too
    (root / ".recipe" / "fit.json").unlink()
    messages.clear()
    run_steps(steps(lr="3e-4"), root, python=str(py), log=messages.append)
    assert _outs(log) == ["run", "samples", "fid.json"]
    assert any("gen: " in m and "fit, which it reads, was just redone" in m for m in messages)


def test_fingerprints_ignore_how_a_step_runs_and_a_checkpoint_of_other_inputs_is_not_resumed(tmp_path):
    py, log = _fake_python(tmp_path)
    root = tmp_path / "r"

    def steps(workers="2", what="hold out images", lr="1e-3"):
        return [
            Step("split", [], out="data", call=lambda r: {}, key="k", what=what),
            Step("fit", ["train", "--data", "data/train", "--workers", workers, "--lr", lr, "--out", "run"], out="run",
                 resumable=True),
        ]  # fmt: skip

    run = lambda s: run_steps(s, root, python=str(py), log=lambda m: None)  # noqa: E731
    run(steps())
    assert _outs(log) == ["run"]
    run(steps(workers="16", what="hold out the validation images"))  # another machine, a reworded log line
    assert _outs(log) == [] and len(finished_steps(steps(workers="16"), root)) == 2
    # an interrupted trainer whose inputs changed since its checkpoint starts over instead of resuming
    (root / ".recipe" / "fit.json").unlink()
    (root / "run").mkdir()
    (root / "run" / "train_state.pt").write_bytes(b"")
    partial = root / ".recipe" / "fit.partial.json"
    messages = []
    failing = tmp_path / "failpy"
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(DigitError, match="step fit failed"):
        run_steps(steps(), root, python=str(failing), log=messages.append)
    assert "(continuing from its last checkpoint)" in "".join(messages)
    assert len(json.loads(partial.read_text())["inputs"]) == 64
    (root / "run").mkdir(exist_ok=True)
    (root / "run" / "train_state.pt").write_bytes(b"")
    run(steps(lr="3e-4"))
    assert log.read_text().splitlines() == ["-m digit train --data data/train --workers 2 --lr 3e-4 --out run"]
    assert not partial.exists()


# ------------------------------------------------------------------------------------------------ report


def _hand_built_recipe(root: Path, figures: dict[int, dict[str, float]]) -> None:
    """The JSON files a finished recipe leaves, with the given per-seed figures (route dino)."""

    def w(rel: str, obj) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(obj))

    def probe(best: float, emb: float) -> dict:
        return {
            "best_top1": best,
            "best_name": "block 2",
            "layers": [{"layer": 0, "top1": emb}, {"layer": 2, "top1": best}],
        }

    w("stability-vq.json", {"snr_db": [30, 20, 10], "token_change_rate": [0.04, 0.12, 0.34]})
    w("dino/stability.json", {"snr_db": [30, 20, 10], "token_change_rate": [0.05, 0.16, 0.45]})
    w("fid/fid-floor.json", {"fid": 3.0})
    for seed, f in figures.items():
        w(f"dino/seed{seed}/fid-digit.json", {"fid": f["fid_d"]})
        w(f"seed{seed}/fid-vq.json", {"fid": f["fid_v"]})
        w(f"dino/seed{seed}/fd-digit.json", {"fd": f["fd_d"]})
        w(f"seed{seed}/fd-vq.json", {"fd": f["fd_v"]})
        w(f"dino/seed{seed}/probe.json", probe(f["pr_d"], 0.3))
        w(f"seed{seed}/probe-vq.json", probe(f["pr_v"], 0.2))
        for run, loss in ((f"dino/seed{seed}/stage1", f["l1"]), (f"seed{seed}/gpt-vq", f["l1"] + 0.3)):
            (root / run).mkdir(parents=True, exist_ok=True)
            (root / run / "metrics.jsonl").write_text(
                json.dumps({"step": 1, "val_loss": 9.0}) + "\n" + json.dumps({"step": 2, "val_loss": loss}) + "\n"
            )


FIGS = {
    0: {"fid_d": 40.0, "fid_v": 50.0, "fd_d": 1.0, "fd_v": 1.5, "pr_d": 0.40, "pr_v": 0.41, "l1": 3.1},
    1: {"fid_d": 42.5, "fid_v": 47.0, "fd_d": 1.6, "fd_v": 1.2, "pr_d": 0.43, "pr_v": 0.40, "l1": 3.2},
    2: {"fid_d": 41.0, "fid_v": 55.5, "fd_d": 1.1, "fd_v": 1.3, "pr_d": 0.42, "pr_v": 0.39, "l1": 3.0},
}


def test_report_mean_and_spread_equal_a_direct_computation(tmp_path):
    _hand_built_recipe(tmp_path, FIGS)
    s = summarise(tmp_path, ["dino"], [0, 1, 2])
    agg = s["routes"]["dino"]["aggregate"]
    for key, fig in (("fid.digit", "fid_d"), ("fid.vq", "fid_v"), ("fd.digit", "fd_d"), ("probe_best_top1.vq", "pr_v"),
                     ("val_loss.stage1", "l1")):  # fmt: skip
        xs = np.array([FIGS[s_][fig] for s_ in (0, 1, 2)])
        got = agg[key]
        assert got["n"] == 3 and got["min"] == xs.min() and got["max"] == xs.max()
        assert got["mean"] == pytest.approx(xs.mean(), abs=1e-12)
        assert got["std"] == pytest.approx(xs.std(ddof=1), abs=1e-12)  # the sample std (n - 1)
    assert agg["val_loss.gpt-vq"]["mean"] == pytest.approx(3.1 + 0.3)  # the last val_loss of each run's metrics
    assert agg["probe_embedding_top1.digit"]["mean"] == pytest.approx(0.3)
    assert agg["val_loss.stage2"] is None  # not measured: no run directory
    v = s["routes"]["dino"]["verdicts"]
    # FID ranges [40, 42.5] vs [47, 55.5] do not overlap and ours is lower; FD and probes overlap; stability fails
    # FID alone would reproduce the generation claim; the FD does not agree, so rule 2 calls it disputed
    assert v == {"stability": "not reproduced", "generation (FID)": "reproduced",
                 "generation (FD, Lite1)": "inconclusive (seed ranges overlap)",
                 "generation": "disputed between feature spaces (FID: reproduced; FD: inconclusive (seed ranges "
                               "overlap))",
                 "understanding": "inconclusive (seed ranges overlap)"}  # fmt: skip
    md = write_summary(tmp_path, [], "tiny", ["dino"], [0, 1, 2])
    fid = agg["fid.digit"]
    assert f"| {fid['mean']:.2f} ± {fid['std']:.2f} [40.00, 42.50] |" in md
    assert "| FID (Inception), VQ | 50.00 | 47.00 | 55.50 |" in md
    assert f"| generation | FID and FD together (disputed when they disagree) |  |  | {v['generation']} |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["routes"]["dino"]["verdicts"] == v


def test_a_figure_measured_on_fewer_seeds_says_so(tmp_path):
    _hand_built_recipe(tmp_path, FIGS)
    (tmp_path / "dino" / "seed2" / "fid-digit.json").unlink()  # that seed's FID never ran
    md = write_summary(tmp_path, [], "tiny", ["dino"], [0, 1, 2])
    fid = np.array([FIGS[s]["fid_d"] for s in (0, 1)])
    cell = f"{fid.mean():.2f} ± {fid.std(ddof=1):.2f} [{fid.min():.2f}, {fid.max():.2f}] (n = 2 of 3)"
    assert f"| {cell} |" in md  # in the claims table and in the per-seed table
    assert md.count("(n = 2 of 3)") == 2 and "(provisional: 2 seed(s))" in md


def test_seeded_verdict_rules():
    a, b = spread([1.0, 2.0, 3.0]), spread([4.0, 5.0, 6.0])
    assert seeded_verdict(a, b, lower_is_better=True) == "reproduced"
    assert seeded_verdict(b, a, lower_is_better=True) == "not reproduced"
    assert seeded_verdict(b, a, lower_is_better=False) == "reproduced"
    assert seeded_verdict(a, spread([3.0, 7.0, 8.0]), True) == "inconclusive (seed ranges overlap)"  # touching: overlap
    assert seeded_verdict(spread([1.0]), spread([2.0]), True) == "reproduced (provisional: 1 seed(s))"
    assert seeded_verdict(a, None, True) == "not measured"
    ok, one, mixed = "reproduced", "reproduced (provisional: 1 seed(s))", "inconclusive (seed ranges overlap)"
    two = "reproduced (provisional: 2 seed(s))"
    assert generation_verdict(ok, ok) == ok and generation_verdict(ok, "not measured") == ok
    assert generation_verdict("not measured", ok) == "not measured"  # never reproduced on the FD alone
    assert generation_verdict(one, one) == one and generation_verdict(ok, one) == one  # fewest seeds decide
    assert generation_verdict(two, one) == one and generation_verdict(one, two) == one
    assert generation_verdict(ok, mixed) == f"disputed between feature spaces (FID: {ok}; FD: {mixed})"
    assert generation_verdict(two, "not reproduced (provisional: 1 seed(s))") == (
        "disputed between feature spaces (FID: reproduced; FD: not reproduced) (provisional: 1 seed(s))"
    )
    assert generation_verdict(f"{mixed} (provisional: 2 seed(s))", mixed) == f"{mixed} (provisional: 2 seed(s))"
    assert spread([None, 2.0, 4.0]) == {
        "mean": 3.0,
        "std": statistics.stdev([2.0, 4.0]),
        "min": 2.0,
        "max": 4.0,
        "n": 2,
    }
    assert spread([5.0])["std"] == 0.0 and spread([None]) is None
    assert aggregate([{k: {"digit": None, "vq": None, "stage1": None, "stage2": None, "gpt-vq": None}
                       for k in ("fid", "fd", "val_loss", "probe_best_top1", "probe_embedding_top1")}])["fid.digit"] is None  # fmt: skip


def test_report_keeps_the_first_run_as_a_column(tmp_path):
    _hand_built_recipe(tmp_path, FIGS)
    baseline = {"encoder_knn_top1": 0.3092, "stability_change_rate": {"digit": {"30": 0.0516, "20": 0.1563, "10": 0.4486}},
                "fd": {"digit": 3.951}, "val_loss": {"stage1": 3.3337}, "probe_best_top1": {"digit": 0.4256}}  # fmt: skip
    (tmp_path / "base.json").write_text(json.dumps(baseline))
    md = write_summary(tmp_path, [], "cpu", ["dino"], [0, 1, 2], baseline=tmp_path / "base.json")
    assert "first run: CPU DINO, 1 seed" in md
    assert "| token change rate at 30 dB | 0.0516 | 0.0500 |" in md
    assert "| FD / FID-proxy, discriminative | 3.951 | 1.233 |" in md  # mean of 1.0, 1.6, 1.1
    assert "| val loss stage 1 | 3.3337 | 3.1000 |" in md


def test_ship_an_effnet_route_stores_the_packaged_encoder(tmp_path, capsys):
    """`recipe ship --route effnet --seed 1`: the tokenizer's packaged weights travel as safetensors inside it (the
    shipped folder needs neither the weights package nor pickle) and give the same tokens; the GPTs of that seed."""
    import torch

    from digit.cli import main
    from digit.tokenizers import load_tokenizer

    rec = tmp_path / "rec"
    data = write_image_folder(rec / "data" / "val", classes=("a", "b"), n_per_class=2, size=(32, 32))
    argv = ["tokenizer", "fit", "--data", str(data), "--encoder", EFFNET, "--encoder-weights", "auto", "--image-size",
            "64", "--layer", "stride16", "--clusters", "4", "--workers", "0", "--no-augment", "--sample-frac", "1.0",
            "--out", str(rec / "effnet" / "tokenizer")]  # fmt: skip
    assert main(argv) == 0
    for part, files in (("vq", ("tokenizer.json", "model.safetensors")),
                        ("effnet/seed1/stage1", ("config.json", "model.safetensors")),
                        ("effnet/seed1/stage2", ("config.json", "model.safetensors"))):  # fmt: skip
        (rec / part).mkdir(parents=True)
        for f in files:
            (rec / part / f).write_text(f"{part}/{f}")  # copied byte for byte, never parsed by ship
    for step in ("effnet/tokenizer", "vq", "effnet/seed1/stage1", "effnet/seed1/stage2"):  # the runner's markers
        (rec / ".recipe" / f"{step}.json").parent.mkdir(parents=True, exist_ok=True)
        (rec / ".recipe" / f"{step}.json").write_text("{}")
    assert (
        main(
            ["recipe", "ship", "--recipe", str(rec), "--route", "effnet", "--seed", "0", "--out", str(tmp_path / "m0")]
        )
        == 2
    )
    assert "route effnet, seed 0" in capsys.readouterr().err
    shipped = tmp_path / "m1"
    assert (
        main(["recipe", "ship", "--recipe", str(rec), "--route", "effnet", "--seed", "1", "--out", str(shipped)]) == 0
    )
    assert (shipped / "stage2" / "model.safetensors").read_text() == "effnet/seed1/stage2/model.safetensors"
    cfg = json.loads((shipped / "tokenizer" / "tokenizer.json").read_text())
    assert cfg["encoder"]["weights"]["kind"] == "stored" and cfg["encoder"]["weights"]["from"]["kind"] == "package"
    manifest = json.loads((shipped / "models.json").read_text())
    assert manifest["route"] == "effnet" and manifest["seed"] == 1
    assert set(manifest["sha256"]) == {p.relative_to(shipped).as_posix() for p in shipped.rglob("*") if p.is_file()} - {
        "models.json", ".digit-output.json"}  # fmt: skip
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = x.float() / 255
    assert torch.equal(
        load_tokenizer(shipped / "tokenizer").encode(x), load_tokenizer(rec / "effnet" / "tokenizer").encode(x)
    )


def test_an_interrupted_recipe_waits_for_its_step_to_write_its_checkpoint(tmp_path, ctrl_c_handled):
    import os
    import signal
    import sys
    import threading
    import time

    from digit.recipes.runner import _run_child

    # a step that needs 1 s to save after Ctrl-C: subprocess.run would have killed it after 0.25 s
    (tmp_path / "child.py").write_text(
        "import os, signal, sys, time\n"
        "def on_int(*a):\n"
        "    time.sleep(1.0)\n"
        "    open('saved', 'w').write('ok')\n"
        "    sys.exit(130)\n"
        "signal.signal(signal.SIGINT, on_int)\n"
        "open('ready.tmp', 'w').write(str(os.getpid()))\n"
        "os.replace('ready.tmp', 'ready')\n"
        "time.sleep(60)\n"
    )

    def ctrl_c():  # what a terminal does: the signal reaches the runner and its child
        while not (tmp_path / "ready").exists():
            time.sleep(0.02)
        os.kill(int((tmp_path / "ready").read_text()), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    logs: list[str] = []
    threading.Thread(target=ctrl_c, daemon=True).start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        _run_child([sys.executable, "child.py"], tmp_path, "gpt", logs.append)
    assert (tmp_path / "saved").read_text() == "ok" and time.perf_counter() - t0 >= 1.0
    assert logs == ["    interrupted: waiting for gpt to stop (interrupt three more times to kill it)"]


def test_a_second_interrupt_still_waits_for_the_step(tmp_path, ctrl_c_handled):
    """The trainer ignores a second Ctrl-C (it is finishing its step and checkpoint); the runner waits through it too."""
    import os
    import signal
    import sys
    import threading
    import time

    from digit.recipes.runner import _run_child

    (tmp_path / "child.py").write_text(
        "import os, signal, sys, time\n"
        "hits = []\n"
        "signal.signal(signal.SIGINT, lambda *a: hits.append(1))\n"
        "open('ready.tmp', 'w').write(str(os.getpid()))\n"
        "os.replace('ready.tmp', 'ready')\n"
        "while not hits:\n"
        "    time.sleep(0.01)\n"
        "time.sleep(1.0)\n"
        "open('saved', 'w').write(str(len(hits)))\n"
        "sys.exit(130)\n"
    )

    def ctrl_c_twice():
        while not (tmp_path / "ready").exists():
            time.sleep(0.02)
        child = int((tmp_path / "ready").read_text())
        for _ in range(2):
            os.kill(child, signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)

    logs: list[str] = []
    threading.Thread(target=ctrl_c_twice, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        _run_child([sys.executable, "child.py"], tmp_path, "gpt", logs.append)
    assert (tmp_path / "saved").read_text() == "2"  # not killed at the second interrupt: it saved after both
    assert len(logs) == 1


def test_ship_refuses_a_step_that_has_not_finished(tmp_path):
    """A stage still training already has config.json and a checkpoint's model.safetensors: only the runner's marker
    says it finished."""
    from digit.errors import DigitError
    from digit.recipes.ship import ship_models

    where = {"distill/tokenizer": ("tokenizer.json", "centroids.npy"), "vq": ("tokenizer.json", "model.safetensors"),
             "distill/seed2/stage1": ("config.json", "model.safetensors"),
             "distill/seed2/stage2": ("config.json", "model.safetensors")}  # fmt: skip
    for d, files in where.items():
        (tmp_path / d).mkdir(parents=True)
        for f in files:
            (tmp_path / d / f).write_text("{}")
    (tmp_path / "data" / "val").mkdir(parents=True)
    for name in ("distill/tokenizer", "vq", "distill/seed2/stage1"):  # stage 2 is still training
        marker = tmp_path / ".recipe" / f"{name}.json"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
    with pytest.raises(DigitError, match="distill/seed2/stage2 not finished"):
        ship_models(tmp_path, tmp_path / "shipped", route="distill", seed=2)
    assert not (tmp_path / "shipped").exists()

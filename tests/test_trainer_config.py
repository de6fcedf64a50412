"""The trainer's typed configuration: optimizer recipes, the step count, and the flags shared by the training commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from digit.cli import build_parser, main
from digit.data.tokens import read_token_dir, write_token_dir
from digit.errors import DigitError
from digit.training.optim import RECIPES, OptimizerConfig, set_hyperparameters
from digit.training.steps import steps_per_epoch, total_steps
from digit.training.trainer import TrainConfig, Trainer

ASSETS = Path(__file__).resolve().parents[1] / "src" / "digit" / "assets" / "cifar10"

# The recipes as `digit train` defined them before they moved into the library (LlamaGen train_c2i.py; DiGIT stage 1).
OLD_RECIPES = {
    "llamagen": dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, schedule="constant", warmup=0,
                     warmup_init_lr=0.0, clip=1.0, label_smoothing=0.0),
    "digit": dict(lr=3e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01, schedule="inverse-sqrt", warmup=6250,
                  warmup_init_lr=1e-7, clip=1.0, label_smoothing=0.1),
}  # fmt: skip


def _tokens(path: Path, n: int = 32) -> Path:
    rng = np.random.default_rng(0)
    return write_token_dir(path, rng.integers(0, 16, (n, 2, 2)), np.arange(n) % 4, vocab_size=16, num_classes=4)


def _parse(*argv: str):
    return build_parser().parse_args([str(a) for a in argv])


def test_optimizer_config_round_trips_and_rejects_bad_values():
    cfg = OptimizerConfig.from_recipe("digit", lr=1e-3, wd_all_params=True, min_lr_ratio=0.1)
    d = cfg.to_dict()
    assert d["betas"] == [0.9, 0.98] and d["recipe"] == "digit" and d["lr"] == 1e-3 and d["warmup"] == 6250
    again = OptimizerConfig.from_dict(json.loads(json.dumps(d)))
    assert again == cfg and again.betas == (0.9, 0.98)
    for bad in ({**d, "momentum": 0.9}, {**d, "betas": [0.9, 1.5]}, {**d, "lr": float("nan")}, {**d, "warmup": -1},
                {**d, "schedule": "linear"}, {**d, "clip": "1"}):  # fmt: skip
        with pytest.raises(DigitError):
            OptimizerConfig.from_dict(bad)
    with pytest.raises(DigitError, match="unknown optimizer recipe"):
        OptimizerConfig.from_recipe("adam")


def test_shipped_run_config_is_an_optimizer_config():
    """Existing run directories keep resuming: config.json "train" holds exactly the optimizer config's keys."""
    train = json.loads((ASSETS / "stage1" / "config.json").read_text())["train"]
    keys = set(OptimizerConfig.from_recipe("llamagen").to_dict())
    loop = set(TrainConfig().to_dict())
    assert set(train) == keys | loop | {"nar"}
    cfg = OptimizerConfig.from_dict({k: train[k] for k in keys})
    assert cfg.to_dict() == {k: train[k] for k in keys}


def test_cli_recipe_values_are_the_published_ones(tmp_path):
    from digit.cli.train import RECIPE_NAMES, optimizer_config

    assert sorted(RECIPE_NAMES) == sorted(RECIPES)
    base = ["train", "--tokens", tmp_path, "--model", "tiny", "--steps", 1, "--out", tmp_path / "r"]
    for name, old in OLD_RECIPES.items():
        got = optimizer_config(_parse(*base, "--recipe", name)).to_dict()
        assert got == {**old, "betas": list(old["betas"]), "min_lr_ratio": 0.0, "wd_all_params": False, "recipe": name}
    got = optimizer_config(_parse(*base, "--recipe", "digit", "--lr", "1e-3", "--betas", "0.8", "0.9", "--warmup", 5,
                                  "--label-smoothing", 0, "--wd-all-params"))  # fmt: skip
    assert (got.lr, got.betas, got.warmup, got.label_smoothing, got.wd_all_params) == (1e-3, (0.8, 0.9), 5, 0.0, True)
    assert (got.weight_decay, got.warmup_init_lr, got.schedule) == (0.01, 1e-7, "inverse-sqrt")  # from the recipe


@pytest.mark.parametrize("recipe,wd_all", [("llamagen", False), ("digit", False), ("digit", True)])
def test_each_recipe_builds_the_optimizer_it_always_did(tmp_path, recipe, wd_all):
    """Param groups, AdamW hyper-parameters and the lr schedule, against the old recipe values and direct formulas."""
    from digit.cli.train import optimizer_config
    from digit.models.presets import build_config
    from digit.training.gpt_task import GPTTask

    flags = ["--wd-all-params"] if wd_all else []
    args = _parse("train", "--tokens", tmp_path, "--model", "tiny", "--steps", 1, "--recipe", recipe, *flags,
                  "--out", tmp_path / "r")  # fmt: skip
    tokens = read_token_dir(_tokens(tmp_path / "tok"))
    model_cfg = build_config("tiny", vocab_size=16, grid=(2, 2), cond="class", num_classes=4)
    task = GPTTask(model_cfg, tokens, optim=optimizer_config(args), seed=0)
    trainer = Trainer(task, TrainConfig(steps=20000, batch_size=8, progress=False), tmp_path / "run")
    trainer.setup()
    (opt,) = trainer.optimizers
    old = OLD_RECIPES[recipe]
    assert opt.defaults["betas"] == old["betas"] and opt.defaults["eps"] == old["eps"]
    assert task.label_smoothing == old["label_smoothing"] and trainer.specs[0].clip == old["clip"]
    named = dict(task.model.named_parameters())
    decayed = {n for n, p in named.items() if wd_all or p.ndim >= 2}
    groups = [({n for n, p in named.items() if any(p is q for q in g["params"])}, g["weight_decay"])
              for g in opt.param_groups]  # fmt: skip
    expect = [(decayed, old["weight_decay"])] + ([] if wd_all else [(set(named) - decayed, 0.0)])
    assert groups == expect
    for step in (0, 1, 100, 6249, 6250, 20000):
        lr = set_hyperparameters(opt, trainer.specs[0], step)
        if old["schedule"] == "constant":
            want = old["lr"]
        elif step < old["warmup"]:  # fairseq inverse_sqrt: linear warmup from warmup_init_lr, then peak*sqrt(w/s)
            want = old["warmup_init_lr"] + (old["lr"] - old["warmup_init_lr"]) * step / old["warmup"]
        else:
            want = old["lr"] * math.sqrt(old["warmup"] / step)
        assert lr == pytest.approx(want, rel=1e-9) and all(g["lr"] == pytest.approx(want) for g in opt.param_groups)


def test_steps_from_epochs():
    assert steps_per_epoch(100, 8) == 12  # drop-last
    assert total_steps(100, 8, epochs=2.5) == 30 and total_steps(100, 8, epochs=0.01) == 1
    assert total_steps(100, 8, epochs=1 / 3) == math.ceil(12 / 3) and total_steps(100, 8, epochs=0.34) == 5
    assert total_steps(100, 8, steps=7) == 7 and total_steps(100, 8, steps=7, epochs=9) == 7  # steps win
    for kw in ({}, {"epochs": 0}, {"epochs": float("nan")}, {"epochs": -1.0}, {"steps": 0}):
        with pytest.raises(DigitError):
            total_steps(100, 8, **kw)
    with pytest.raises(DigitError, match="fewer than one global batch"):
        steps_per_epoch(7, 8)


def test_trainer_owns_the_step_count(tmp_path, capsys):
    """`digit train --epochs` runs the trainer's count, and a task built for another length is refused."""
    from digit.models.presets import build_config
    from digit.training.gpt_task import GPTTask

    tok = _tokens(tmp_path / "tok", n=36)  # batch 8: 4 steps per epoch
    assert main(["train", "--tokens", str(tok), "--model", "tiny", "--epochs", "1.5", "--batch-size", "8",
                 "--log-every", "1", "--no-progress", "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    assert "6 steps of 8" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    tokens = read_token_dir(tok)
    model_cfg = build_config("tiny", vocab_size=16, grid=(2, 2))
    task = GPTTask(model_cfg, tokens, optim=RECIPES["llamagen"], total_steps=10)
    with pytest.raises(DigitError, match="built for 10 steps"):
        Trainer(task, TrainConfig(epochs=1.5, batch_size=8), tmp_path / "other")
    task = GPTTask(model_cfg, tokens, optim=RECIPES["llamagen"])
    Trainer(task, TrainConfig(epochs=1.5, batch_size=8), tmp_path / "other")
    assert task.total_steps == 6


def test_trainer_flags_are_shared_and_the_old_worker_flag_still_works(tmp_path):
    from digit.cli.common import trainer_config

    data, out = str(tmp_path), str(tmp_path / "o")
    commands = {
        "train": ["train", "--tokens", data, "--model", "tiny", "--steps", "3", "--out", out],
        "vq train": ["vq", "train", "--data", data, "--steps", "3", "--out", out],
        "encoder pretrain": ["encoder", "pretrain", "--data", data, "--encoder", "vit", "--epochs", "1", "--out", out],
    }
    batch = {"train": 8, "vq train": 16, "encoder pretrain": 256}  # each task's recipe keeps its own batch
    for name, argv in commands.items():
        cfg = trainer_config(_parse(*argv))
        assert (cfg.num_workers, cfg.save_every, cfg.log_every, cfg.parallel, cfg.precision, cfg.progress) == (
            0, 1000, 10, "none", "auto", True
        ), name  # fmt: skip
        assert cfg.batch_size == batch[name]
        for flag in ("--workers", "--num-workers"):  # --num-workers: encoder pretrain's old name, now a hidden alias
            assert trainer_config(_parse(*argv, flag, "3")).num_workers == 3, (name, flag)
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    helps = {"train": sub["train"].format_help(), "encoder pretrain": sub["encoder"]._subparsers._group_actions[0]
             .choices["pretrain"].format_help()}  # fmt: skip
    for text in helps.values():
        assert "--workers" in text and "--num-workers WORKERS" not in text and "--save-every" in text
    with pytest.raises(SystemExit):  # the encoder's schedules are in epochs: no --steps
        _parse(*commands["encoder pretrain"], "--steps", "3")
    with pytest.raises(SystemExit):
        _parse(*commands["vq train"], "--epochs", "0")
    assert not hasattr(_parse(*commands["encoder pretrain"]), "grad_accum")


def test_gpt_task_accepts_the_old_optimizer_dict(tmp_path):
    from digit.models.presets import build_config
    from digit.training.gpt_task import GPTTask

    tokens = read_token_dir(_tokens(tmp_path / "tok"))
    model_cfg = build_config("tiny", vocab_size=16, grid=(2, 2))
    old = {k: v for k, v in OLD_RECIPES["digit"].items() if k != "label_smoothing"}
    task = GPTTask(model_cfg, tokens, optim=old, label_smoothing=0.2, total_steps=5)
    assert task.optim == OptimizerConfig(**old, label_smoothing=0.2) and task.label_smoothing == 0.2
    (spec,) = task.optimizers()
    assert spec.lr_at(0) == pytest.approx(1e-7) and spec.betas == (0.9, 0.98)
    assert task.config()["train"] == {**task.optim.to_dict(), "nar": False}


def test_parallel_auto_is_ddp_under_torchrun_and_none_in_one_process(tmp_path, monkeypatch):
    import digit.utils.distributed as distributed
    from digit.cli.common import trainer_config
    from digit.errors import DigitError

    argv = ["train", "--tokens", str(tmp_path), "--model", "tiny", "--steps", "3", "--out", str(tmp_path / "o")]
    assert trainer_config(_parse(*argv)).parallel == "none"
    assert trainer_config(_parse(*argv, "--parallel", "fsdp")).parallel == "fsdp"
    monkeypatch.setattr(distributed, "get_dist_info", lambda: distributed.DistInfo(rank=0, world_size=2))
    assert trainer_config(_parse(*argv)).parallel == "ddp"
    assert trainer_config(_parse(*argv, "--parallel", "fsdp")).parallel == "fsdp"
    with pytest.raises(DigitError, match="pass --parallel ddp or fsdp"):
        trainer_config(_parse(*argv, "--parallel", "none"))

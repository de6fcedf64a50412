"""The generic trainer on tiny tasks of its own: schedules, optimizer groups, clipping, EMA, exact resume, phases."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from digit.errors import DigitError
from digit.training import OptimizerSpec, TaskBase, TrainConfig, Trainer
from digit.training.checkpoint import load_train_state, rng_state, set_rng_state
from digit.training.ema import EMA, ema_update_
from digit.training.optim import (
    build_adamw,
    clip_grad_norm,
    inverse_sqrt,
    make_schedule,
    param_groups,
    set_hyperparameters,
    warmup_cosine,
)
from digit.training.run_files import compare_configs
from digit.training.steps import epoch_permutation


class ToyTask(TaskBase):
    """Regression with dropout (exercises the checkpointed RNG) and a ModuleList (the default shard units)."""

    name = "toy"

    def __init__(self, n: int = 40, seed: int = 0, lr: float = 1e-2, wd_schedule=None) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 6, generator=g)
        y = torch.sin(x @ torch.randn(6, 2, generator=g))
        self.dataset = [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(n)]
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 2))
        self.lr, self.wd_schedule, self.calls = lr, wd_schedule, []
        self.seen: list[int] = []

    def modules(self):
        return {"model": self.net}

    def optimizers(self):
        return [
            OptimizerSpec(
                modules=["model"],
                lr=self.lr,
                weight_decay=0.1,
                clip=0.5,
                schedule=warmup_cosine(3, 20),
                wd_schedule=self.wd_schedule,
            )
        ]

    def compute_loss(self, batch, step, phase):
        self.seen += batch["index"].tolist()
        return ((self.net(batch["x"]) - batch["y"]) ** 2).mean(), {
            "abs": (self.net(batch["x"]) - batch["y"]).abs().mean()
        }

    def after_optimizer_step(self, step, phase):
        self.calls.append((step, phase))


def run(task, out, steps, resume=False, **kw):
    cfg = TrainConfig(steps=steps, batch_size=kw.pop("batch_size", 8), seed=0, progress=False, **kw)
    return Trainer(task, cfg, out, resume=resume).fit()


# ---------------------------------------------------------------- schedules and optimizer
def test_schedules_match_formulas():
    cos = warmup_cosine(10, 110, min_ratio=0.1)
    assert cos(0) == 0.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    # fairseq inverse_sqrt: lr = init + s * (peak - init) / warmup, then peak * sqrt(warmup / s)
    peak, init, warm = 3e-4, 1e-7, 6250
    sched = inverse_sqrt(warm, warmup_init=init / peak)
    for s in (0, 1, 3000, 6249):
        assert peak * sched(s) == pytest.approx(init + s * (peak - init) / warm, rel=1e-9)
    for s in (6250, 10000, 125000):
        assert peak * sched(s) == pytest.approx(peak * math.sqrt(warm) / math.sqrt(s), rel=1e-12)
    const = make_schedule("constant", warmup=0, total=10)
    assert [const(s) for s in (0, 5, 99)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        make_schedule("linear", warmup=0, total=1)


def test_weight_decay_only_on_matrices_and_scheduled():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(3, 4))
    spec = OptimizerSpec(
        modules=["m"], lr=1e-3, weight_decay=0.05, wd_schedule=lambda s: 0.04 + 0.01 * s, schedule=lambda s: 0.5
    )
    named = list(net.named_parameters())
    groups = param_groups(named, spec)
    decayed = {n for g in groups if g["decay"] for n in g["names"]}
    assert decayed == {"0.weight", "2.weight"}
    opt = build_adamw(named, spec, torch.device("cpu"))
    lr = set_hyperparameters(opt, spec, step=3)
    assert lr == pytest.approx(5e-4)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(5e-4, pytest.approx(0.07)), (5e-4, 0.0)]
    # one AdamW step with zero gradients: decoupled decay only (p -= lr * wd * p), nothing on the 1-D tensors
    before = {n: p.detach().clone() for n, p in named}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in named:
        want = before[n] * (1 - 5e-4 * 0.07) if n in decayed else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7)


def test_clip_grad_norm_is_global_l2():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    norm = clip_grad_norm([a, b], 1.0)
    assert float(norm) == pytest.approx(5.0)
    total = torch.cat([a.grad.flatten(), b.grad.flatten()]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-5)
    assert float(clip_grad_norm([a, b], None)) == pytest.approx(1.0, rel=1e-5)


def test_ema_matches_formula():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(net, 0.9)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.fill_(7.0)
        net[1].num_batches_tracked.fill_(5)
    ema.update()
    cur = net.state_dict()
    for k in ema.param_names:
        torch.testing.assert_close(ema.shadow[k], 0.9 * start[k] + 0.1 * cur[k])
    assert (ema.shadow["1.running_mean"] == 7.0).all() and int(ema.shadow["1.num_batches_tracked"]) == 5
    t, s = [torch.ones(2)], [torch.zeros(2)]
    ema_update_(t, s, 0.75)
    torch.testing.assert_close(t[0], torch.full((2,), 0.75))


def test_rng_state_round_trip(tmp_path):
    import random

    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a


def test_epoch_permutation_is_pure_and_covers():
    p0 = epoch_permutation(50, 3, 0)
    assert (p0 == epoch_permutation(50, 3, 0)).all() and sorted(p0.tolist()) == list(range(50))
    assert not (p0 == epoch_permutation(50, 3, 1)).all() and not (p0 == epoch_permutation(50, 4, 0)).all()


# ---------------------------------------------------------------- the loop
def test_resume_n_plus_n_equals_2n(tmp_path):
    full = ToyTask()
    run(full, tmp_path / "full", 12, grad_accum=2, ema=0.8, save_every=5)
    part = ToyTask()
    run(part, tmp_path / "part", 7, grad_accum=2, ema=0.8, save_every=5)
    resumed = ToyTask()
    run(resumed, tmp_path / "part", 12, resume=True, grad_accum=2, ema=0.8, save_every=5)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k, v in resumed.net.state_dict().items():  # the live weights too, not only the EMA export
        assert torch.equal(v, full.net.state_dict()[k])
    la = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == list(range(1, 13))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    # the data order: 40 samples, batch 8 -> 5 steps per epoch, each epoch a permutation of all samples
    assert sorted(full.seen[:40]) == list(range(40)) and sorted(full.seen[40:80]) == list(range(40))
    assert full.calls == [(s, "main") for s in range(12)]
    # train_state.pt loads with weights_only=True and holds what resume needs
    state = torch.load(tmp_path / "full" / "train_state.pt", weights_only=True)
    assert state["step"] == 12 and state["epoch"] == 2 and state["batch_in_epoch"] == 2
    assert set(state) >= {"modules", "optimizers", "ema", "rng", "config", "task"}
    assert load_train_state(tmp_path / "full" / "train_state.pt")["step"] == 12


class EvalToy(ToyTask):
    def evaluate(self, step):
        x = torch.stack([d["x"] for d in self.dataset[:16]])
        y = torch.stack([d["y"] for d in self.dataset[:16]])
        return {"val": float(((self.net(x) - y) ** 2).mean())}


def test_with_an_ema_the_saved_weights_are_evaluated_too(tmp_path):
    """model.safetensors holds the EMA: its figures are logged as ``val_ema`` beside the live weights' ``val``, and
    swapping the EMA in and out for that leaves training bit for bit unchanged."""
    task = EvalToy()
    run(task, tmp_path / "eval", 12, ema=0.8, eval_every=4)
    quiet = ToyTask()
    run(quiet, tmp_path / "quiet", 12, ema=0.8)
    for k, v in task.net.state_dict().items():
        assert torch.equal(v, quiet.net.state_dict()[k])
    last = [json.loads(x) for x in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 12 and {"val", "val_ema"} <= set(last)
    task.net.eval()  # dropout off, as in the trainer's evaluation
    assert last["val"] == pytest.approx(task.evaluate(12)["val"], rel=1e-6)
    net = EvalToy()
    net.net.eval()
    net.net.load_state_dict(load_file(tmp_path / "eval" / "model.safetensors"))
    assert last["val_ema"] == pytest.approx(net.evaluate(12)["val"], rel=1e-6) and last["val_ema"] != last["val"]


def test_metrics_lr_and_wd_schedules(tmp_path):
    task = ToyTask(wd_schedule=lambda s: 0.01 * s)
    run(task, tmp_path / "r", 6)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    sched = warmup_cosine(3, 20)
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * sched(s) for s in range(6)])
    assert all({"loss", "abs", "grad_norm", "samples_per_s"} <= set(r) for r in rows)
    opt_wd = torch.load(tmp_path / "r" / "train_state.pt", weights_only=True)["optimizers"]["main"]["param_groups"]
    assert [g["weight_decay"] for g in opt_wd] == pytest.approx([0.05, 0.0])


class TwoPhaseTask(TaskBase):
    """A generator/discriminator pair the way the VQGAN task runs: two optimizers, the second switched on later."""

    name = "gan"

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.dataset = torch.randn(32, 4, generator=g)
        torch.manual_seed(1)
        self.gen, self.disc = nn.Linear(4, 4), nn.Linear(4, 1)
        self.phases: list[tuple[int, str]] = []

    def modules(self):
        return {"generator": self.gen, "discriminator": self.disc}

    def optimizers(self):
        return [
            OptimizerSpec(name="generator", modules=["generator"], lr=1e-2),
            OptimizerSpec(name="discriminator", modules=["discriminator"], lr=1e-2, active=lambda s: s >= 3),
        ]

    def compute_loss(self, batch, step, phase):
        self.phases.append((step, phase))
        if phase == "generator":
            fake = self.gen(batch)
            return (fake - batch).pow(2).mean() - 0.1 * self.disc(fake).mean(), {}
        with torch.no_grad():  # the generator only feeds this phase (DDP would wait for its gradients otherwise)
            fake = self.gen(batch)
        logits = self.disc(torch.cat([batch, fake]))
        real, fk = logits.chunk(2)
        return torch.relu(1 - real).mean() + torch.relu(1 + fk).mean(), {}  # hinge


def test_two_phases_isolate_gradients_and_resume(tmp_path):
    task = TwoPhaseTask()
    d0 = task.disc.weight.detach().clone()
    run(task, tmp_path / "a", 3)
    assert torch.equal(task.disc.weight, d0)  # the generator phase's gradients never reach the discriminator
    run(TwoPhaseTask(), tmp_path / "a", 6, resume=True)
    full = TwoPhaseTask()
    run(full, tmp_path / "b", 6)
    assert full.phases[:4] == [(0, "generator"), (1, "generator"), (2, "generator"), (3, "generator")]
    assert full.phases[4] == (3, "discriminator")
    sa = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)["modules"]
    sb = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)["modules"]
    for m in sa:
        assert all(torch.equal(sa[m][k], sb[m][k]) for k in sa[m])
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert "discriminator_loss" not in rows[2] and "discriminator_loss" in rows[3]


def test_refusals(tmp_path):
    run(ToyTask(), tmp_path / "r", 2)
    with pytest.raises(DigitError, match="already holds a run"):
        run(ToyTask(), tmp_path / "r", 2)
    with pytest.raises(DigitError, match="config differs.*batch_size"):
        run(ToyTask(), tmp_path / "r", 4, resume=True, batch_size=4)
    with pytest.raises(DigitError, match="not divisible"):
        run(ToyTask(), tmp_path / "s", 2, batch_size=6, grad_accum=4)
    with pytest.raises(DigitError, match="fewer than one global batch"):
        run(ToyTask(n=4), tmp_path / "t", 2)
    assert compare_configs({"train": {"steps": 1, "lr": 1}}, {"train": {"steps": 9, "lr": 1}}) == []
    assert compare_configs({"model": {"dim": 8}}, {"model": {"dim": 16}}) == ["model.dim"]


class SignalAtStep(ToyTask):
    """Sends itself ``times`` SIGINTs while computing step ``at``'s loss: a Ctrl-C arriving mid-step."""

    def __init__(self, at: int, times: int = 1) -> None:
        super().__init__()
        self.at, self.times = at, times

    def compute_loss(self, batch, step, phase):
        if step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
        return super().compute_loss(batch, step, phase)


def test_a_signal_finishes_the_step_checkpoints_and_resume_is_exact(tmp_path, ctrl_c_handled, capfd):
    from digit.training.interrupt import TrainingInterrupted

    full = ToyTask()
    run(full, tmp_path / "full", 12, ema=0.8)
    handler = signal.getsignal(signal.SIGINT)
    capfd.readouterr()
    with pytest.raises(TrainingInterrupted, match=r"after step 4 of 12.*--resume"):
        run(SignalAtStep(at=3), tmp_path / "part", 12, ema=0.8)
    # written by the handler straight to fd 2 (not print, which a signal inside a write would re-enter)
    err = capfd.readouterr().err
    assert err.count("SIGINT: stopping after this step with a checkpoint (twice more to stop without)") == 1
    assert signal.getsignal(signal.SIGINT) is handler  # the trainer's handlers are gone after the run
    state = torch.load(tmp_path / "part" / "train_state.pt", weights_only=True)
    assert state["step"] == 4  # the step in flight (index 3) finished; nothing after it ran
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    resumed = ToyTask()
    run(resumed, tmp_path / "part", 12, resume=True, ema=0.8)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k, v in resumed.net.state_dict().items():
        assert torch.equal(v, full.net.state_dict()[k])


def test_a_third_signal_stops_at_once_without_a_checkpoint(tmp_path, ctrl_c_handled):
    from digit.training.interrupt import TrainingInterrupted

    with pytest.raises(KeyboardInterrupt) as e:
        run(SignalAtStep(at=2, times=3), tmp_path / "r", 12, save_every=2)
    assert not isinstance(e.value, TrainingInterrupted)
    assert torch.load(tmp_path / "r" / "train_state.pt", weights_only=True)["step"] == 2  # the last regular one
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored_and_sigterm_still_stops(tmp_path):
    """Started with SIGINT ignored (``cmd &`` from a script, nohup-style launchers), a run is not stopped by a Ctrl-C
    meant for the foreground; SIGTERM, the way to stop such a job, still checkpoints."""
    from digit.training.interrupt import TrainingInterrupted

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run(SignalAtStep(at=3), tmp_path / "ign", 6)
        assert torch.load(tmp_path / "ign" / "train_state.pt", weights_only=True)["step"] == 6  # ran to the end
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN

        class TermAtStep(SignalAtStep):
            def compute_loss(self, batch, step, phase):
                if step == self.at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return ToyTask.compute_loss(self, batch, step, phase)

        with pytest.raises(TrainingInterrupted, match="after step 3 of 6"):
            run(TermAtStep(at=2), tmp_path / "term", 6)
        assert torch.load(tmp_path / "term" / "train_state.pt", weights_only=True)["step"] == 3
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_forked_worker_leaves_the_decision_to_the_main_process(ctrl_c_handled):
    from digit.training.interrupt import StopRequest

    with StopRequest() as stop:
        stop._pid = -1  # what a data-loader worker forked inside the block sees: another process's handler
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.count == 0 and not stop.requested()


def test_ranks_agree_on_a_stop_after_every_step(ctrl_c_handled):
    import torch.distributed as dist

    from digit.training.interrupt import StopRequest

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with StopRequest(distributed=True) as stop:
            assert not stop.requested()
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.count == 1
            assert stop.requested()  # the max over ranks (all_reduce) carries the flag
    finally:
        dist.destroy_process_group()


def test_changing_the_length_on_resume_is_noted(tmp_path, capsys):
    run(ToyTask(), tmp_path / "r", 4)
    capsys.readouterr()
    run(ToyTask(), tmp_path / "r", 4, resume=True)
    assert "length changed" not in capsys.readouterr().err
    run(ToyTask(), tmp_path / "r", 8, resume=True)  # extending is allowed: the cosine horizon moves, and it says so
    err = capsys.readouterr().err
    assert "the run's length changed ({'steps': 4, 'epochs': None} -> {'steps': 8, 'epochs': None})" in err

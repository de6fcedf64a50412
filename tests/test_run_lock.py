"""One process per run directory: the trainer locks it; a second process is refused; a killed holder never blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from digit.cli import main
from digit.data.tokens import write_token_dir
from digit.errors import DigitError
from digit.training import OptimizerSpec, TaskBase, TrainConfig, Trainer
from digit.utils.locking import LOCK_FILE, DirectoryLock


class ProbingTask(TaskBase):
    """A linear regression that, at its first step, tries to take the run directory's lock as another user would."""

    name = "probing"

    def __init__(self, out: Path) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 3, generator=g)
        self.dataset = [{"x": x[i], "y": x[i].sum(0, keepdim=True)} for i in range(16)]
        self.net = nn.Linear(3, 1)
        self.out, self.refusal = out, None

    def modules(self):
        return {"model": self.net}

    def optimizers(self):
        return [OptimizerSpec(modules=["model"], lr=1e-2)]

    def compute_loss(self, batch, step, phase):
        if step == 0:
            try:
                DirectoryLock.acquire(self.out, grace_s=0).release()
            except DigitError as e:
                self.refusal = str(e)
        return ((self.net(batch["x"]) - batch["y"]) ** 2).mean(), {}


def test_trainer_holds_the_lock_while_it_runs_and_releases_it(tmp_path):
    out = tmp_path / "run"
    task = ProbingTask(out)
    Trainer(task, TrainConfig(steps=2, batch_size=4, progress=False), out).fit()
    assert task.refusal is not None and f"pid {os.getpid()}" in task.refusal and str(out) in task.refusal
    assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    DirectoryLock.acquire(out, grace_s=0).release()  # free again after fit


def test_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "run"
    Trainer(ProbingTask(out), TrainConfig(steps=1, batch_size=4, progress=False), out).fit()
    with pytest.raises(DigitError, match="already holds a run"):
        Trainer(ProbingTask(out), TrainConfig(steps=1, batch_size=4, progress=False), out).fit()
    DirectoryLock.acquire(out, grace_s=0).release()


@pytest.fixture
def tokens(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    return write_token_dir(tmp_path / "tok", rng.integers(0, 16, (16, 4, 4)), np.arange(16) % 2, vocab_size=16)


def _train_argv(tokens: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--tokens", str(tokens), "--model", "tiny", "--batch-size", "4", "--no-progress",
            "--log-every", "1", "--steps", str(steps), *extra, "--out", str(out)]  # fmt: skip


def test_second_process_is_refused_and_a_killed_holder_does_not_block_resume(tokens, tmp_path, capsys):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    holder = subprocess.Popen(
        [sys.executable, "-m", "digit", *_train_argv(tokens, out, 10**8)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file():  # written after the lock is taken: the run is training
            assert holder.poll() is None, holder.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first run never started"
            time.sleep(0.2)
        for extra in (["--resume"], []):
            capsys.readouterr()
            assert main(_train_argv(tokens, out, 2, *extra)) == 2
            err = capsys.readouterr().err
            assert f"another process (pid {holder.pid})" in err and str(out) in err, err
        assert holder.poll() is None  # the refusals did not disturb the running process
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        holder.stderr.close()
    assert holder.returncode == -signal.SIGKILL
    capsys.readouterr()
    assert main(_train_argv(tokens, out, 2, "--resume")) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and (out / "train_state.pt").is_file()

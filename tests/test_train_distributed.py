"""`torchrun --nproc_per_node 2 digit train` (gloo, CPU) with DDP and FSDP2 follows the single-process loss curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from digit.cli import main
from digit.data.tokens import write_token_dir

pytestmark = pytest.mark.dist

STEPS = 5


def torchrun(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", *"--standalone --nproc_per_node 2 -m digit train".split()]
    cmd += list(map(str, args))
    # Own session: on a timeout the workers die with the launcher instead of lingering on the shared machine.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    data = write_token_dir(
        tmp / "tok", rng.integers(0, 32, (32, 4, 4)), np.arange(32) % 4, vocab_size=32, class_names=list("abcd")
    )
    # dropout 0 and class dropout 0: every layout then computes the same function of the same global batch
    common = (
        f"--tokens {data} --model tiny --class-cond --class-dropout 0 --batch-size 8 --lr 3e-3 --recipe llamagen "
        "--warmup 2 --schedule cosine --no-progress --log-every 1 --seed 3"
    ).split()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *map(str, [*common, "--steps", STEPS, "--out", tmp / "single"])]) == 0
    finally:
        torch.set_num_threads(n)
    return tmp, common


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == STEPS
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_ddp_with_accumulation_matches_single_process(setup):
    tmp, common = setup
    torchrun(*common, "--steps", STEPS, "--parallel", "ddp", "--grad-accum", 2, "--out", tmp / "ddp")
    assert_same_run(tmp / "single", tmp / "ddp")


def test_fsdp_matches_single_process_and_resumes(setup):
    tmp, common = setup
    # a first leg of 3 steps, then resume to 5: also checks the gathered checkpoint and its sharded reload
    torchrun(*common, "--steps", 3, "--save-every", 2, "--parallel", "fsdp", "--out", tmp / "fsdp")
    torchrun(*common, "--steps", STEPS, "--parallel", "fsdp", "--resume", "--out", tmp / "fsdp")
    assert_same_run(tmp / "single", tmp / "fsdp")
    state = torch.load(tmp / "fsdp" / "train_state.pt", weights_only=True)
    assert state["step"] == STEPS and len(state["rng"]) == 2


def test_with_an_ema_fsdp_logs_the_live_weights_figures_only(setup):
    """Evaluating the EMA swaps its weights in; under FSDP that would mix sharded and unsharded layouts, so FSDP logs
    the live weights' validation loss alone, the same figure DDP logs beside its ``_ema``."""
    tmp, common = setup
    data = common[common.index("--tokens") + 1]
    extra = ["--ema", "0.5", "--val-tokens", data, "--eval-every", 2, "--steps", 2]
    torchrun(*common, *extra, "--parallel", "ddp", "--out", tmp / "ema-ddp")
    torchrun(*common, *extra, "--parallel", "fsdp", "--out", tmp / "ema-fsdp")

    def evals(run: Path) -> dict:
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        (rec,) = [r for r in recs if any(k.startswith("val") for k in r)]
        return {k: v for k, v in rec.items() if k.startswith("val")}

    ddp, fsdp = evals(tmp / "ema-ddp"), evals(tmp / "ema-fsdp")
    assert "val_loss" in ddp and "val_loss_ema" in ddp and ddp["val_loss_ema"] != ddp["val_loss"]
    assert set(fsdp) == set(ddp) - {k for k in ddp if k.endswith("_ema")}
    for k in fsdp:
        assert fsdp[k] == pytest.approx(ddp[k], rel=1e-5)


def test_teardown_waits_for_every_rank_only_after_success_and_never_hangs(monkeypatch):
    """After a command succeeds, a rank waits (bounded) for the others before destroying its process group, so none
    tears gloo down while rank 0 still writes the last checkpoint; after a failure, or when the wait fails, it tears
    down at once."""
    import types

    from digit.cli import _release_process_group

    calls = []

    def fake(backend="gloo", fail=False):
        def monitored_barrier(timeout):
            calls.append(("monitored_barrier", timeout.total_seconds()))
            if fail:
                raise RuntimeError("rank 1 did not reach the barrier")

        return types.SimpleNamespace(
            is_available=lambda: True,
            is_initialized=lambda: True,
            get_world_size=lambda: 2,
            get_backend=lambda: backend,
            monitored_barrier=monitored_barrier,
            barrier=lambda: calls.append(("barrier",)),
            destroy_process_group=lambda: calls.append(("destroy",)),
        )

    monkeypatch.setitem(sys.modules, "torch.distributed", fake())
    _release_process_group(together=True)
    assert calls == [("monitored_barrier", 120.0), ("destroy",)]
    calls.clear()
    _release_process_group(together=False)
    assert calls == [("destroy",)]
    calls.clear()
    monkeypatch.setitem(sys.modules, "torch.distributed", fake(fail=True))
    _release_process_group(together=True)
    assert calls == [("monitored_barrier", 120.0), ("destroy",)]
    calls.clear()
    monkeypatch.setitem(sys.modules, "torch.distributed", fake(backend="nccl"))
    _release_process_group(together=True)
    assert calls == [("barrier",), ("destroy",)]

"""`torchrun --nproc_per_node 2 digit tokenize` (gloo, CPU) writes exactly what one process writes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import tar_folder, tiny_fit_argv, write_image_folder
from digit.cli import main
from digit.data.tokens import read_token_dir


@pytest.mark.dist
@pytest.mark.filterwarnings("ignore:RANDOM-INIT")
def test_torchrun_tokenize_equals_single_process(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), n_per_class=5)
    (root / "b" / "junk.txt").write_text("skip me")
    arc = tar_folder(root, tmp_path / "imgs.tar")
    tok = tmp_path / "tok"
    assert main(tiny_fit_argv(str(root), str(tok), 6, "--sample-frac", "1", "--niter", "3")) == 0
    assert (
        main(
            [
                "tokenize",
                "--tokenizer",
                str(tok),
                "--data",
                str(arc),
                "--flip",
                "--workers",
                "0",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "single"),
            ]
        )
        == 0
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "digit",
        "tokenize",
        "--tokenizer",
        str(tok),
        "--data",
        str(arc),
        "--flip",
        "--workers",
        "1",
        "--batch-size",
        "3",
        "--out",
        str(tmp_path / "multi"),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_token_dir(tmp_path / "single"), read_token_dir(tmp_path / "multi")
    assert len(a) == 30 and np.array_equal(a.tokens, b.tokens) and np.array_equal(a.labels, b.labels)
    assert a.meta["source"]["n_skipped"] == b.meta["source"]["n_skipped"] == 1
    assert not (tmp_path / ".multi.shards").exists()


@pytest.mark.dist
@pytest.mark.filterwarnings("ignore:RANDOM-INIT")
def test_torchrun_strict_failure_on_one_rank_stops_every_rank(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=3)
    (root / "a" / "img_000.png").write_bytes(b"broken")  # index 0: rank 0's shard
    tok = tmp_path / "tok"
    assert main(tiny_fit_argv(root, tok, 4, "--sample-frac", "1", "--niter", "2")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "digit",
           "tokenize", "--tokenizer", str(tok), "--data", str(root), "--strict", "--workers", "0",
           "--out", str(tmp_path / "multi")]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "a/img_000.png" in res.stderr
    assert not (tmp_path / "multi").exists()

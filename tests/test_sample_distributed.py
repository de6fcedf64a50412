"""`torchrun --nproc_per_node 2 -m digit sample / generate` (gloo, CPU; the plain form, no "--") write exactly what one
process writes."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from digit.cli import main
from digit.data.tokens import read_token_dir
from digit.models import GPT, build_config
from digit.pipeline import GenerationResult, merge_results
from digit.tokenizers.vq import VQModel
from digit.utils.io import atomic_save_safetensors
from test_sampling import class_model, write_run


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    """The documented plain form `torchrun --nproc_per_node 2 -m digit CMD ...` (no "--")."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "digit"]
    cmd += argv
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _command_options(name: str) -> list[str]:
    from digit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [s for a in sub.choices[name]._actions for s in a.option_strings]


@pytest.mark.parametrize("command", ["sample", "generate"])
def test_torchrun_passes_our_flags_through(command):
    """torchrun's parser classifies every argument, the script's included, and refuses an ambiguous abbreviation of
    its own options before our parser runs: every flag of `sample` and `generate` must reach us untouched, except
    `sample --run` (ambiguous with --run-path / --run_path), whose torchrun spelling is --gpt-run."""
    from torch.distributed.run import get_args_parser

    torchrun_parser = get_args_parser()
    refused = []
    for flag in _command_options(command):
        argv = ["--nproc_per_node", "2", "-m", "digit", command, flag, "x", "--out", "o"]
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                got = torchrun_parser.parse_args(argv)
        except SystemExit:
            refused.append(flag)
            continue
        if got.training_script != "digit" or got.training_script_args != [command, flag, "x", "--out", "o"]:
            refused.append(flag)
    assert refused == (["--run"] if command == "sample" else [])
    if command == "sample":
        from digit.cli import build_parser

        a = build_parser().parse_args(["sample", "--gpt-run", ".", "-n", "1", "--out", "o"])
        b = build_parser().parse_args(["sample", "--run", ".", "-n", "1", "--out", "o"])
        assert a.run == b.run and a.precision == b.precision == "fp32"


@pytest.mark.dist
def test_torchrun_sample_equals_single_process(tmp_path):
    run = write_run(tmp_path / "run", class_model())
    # 7 samples in batches of 2: rank 0 gets batches 0 and 2 (and the last, short one), rank 1 batches 1 and 3
    argv = ["sample", "--run", str(run), "-n", "7", "--batch-size", "2", "--cfg-scale", "2.5", "--top-k", "12",
            "--top-p", "0.9", "--seed", "3", "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "single")]) == 0
    argv[1] = "--gpt-run"  # torchrun refuses --run (an abbreviation of its --run-path); --gpt-run is the same flag
    res = torchrun(*argv, "--out", str(tmp_path / "multi"))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_token_dir(tmp_path / "single"), read_token_dir(tmp_path / "multi")
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.labels, b.labels)
    assert a.labels.tolist() == [0, 1, 2, 3, 0, 1, 2]
    sa, sb = a.meta["sampling"], b.meta["sampling"]
    assert sa["forward_passes"] == sb["forward_passes"] == 4 * 16
    assert (sa["world_size"], sb["world_size"]) == (1, 2)
    assert {k: v for k, v in sa.items() if k != "world_size"} == {k: v for k, v in sb.items() if k != "world_size"}


@pytest.mark.dist
def test_torchrun_generate_equals_single_process(tmp_path):
    torch.manual_seed(0)
    vq = VQModel.from_preset("tiny", image_size=16, codebook_size=32)
    vq.save(tmp_path / "vq")
    model = GPT(build_config("tiny", vocab_size=32, grid=(4, 4), cond="class", num_classes=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    (tmp_path / "s1").mkdir()
    cfg = {"model": model.config.to_dict(), "train": {}, "data": {"meta": {"class_names": list("abcd")}}, "task": "gpt"}
    (tmp_path / "s1" / "config.json").write_text(json.dumps(cfg))
    atomic_save_safetensors(tmp_path / "s1" / "model.safetensors", model.state_dict())
    argv = ["generate", "--stage1", str(tmp_path / "s1"), "--vq", str(tmp_path / "vq"), "-n", "5", "--classes", "1",
            "c", "--batch-size", "2", "--cfg-scale", "2", "--top-k", "10", "--seed", "5", "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "single")]) == 0
    res = torchrun(*argv, "--out", str(tmp_path / "multi"))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = (np.load(tmp_path / d / "samples.npz") for d in ("single", "multi"))
    assert np.array_equal(a["images"], b["images"]) and a["labels"].tolist() == b["labels"].tolist() == [1, 2, 1, 2, 1]
    ma, mb = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("single", "multi"))
    assert ma["forward_passes"] == mb["forward_passes"] == {"stage1": 3 * 16, "stage2": 0}
    assert (ma["world_size"], mb["world_size"]) == (1, 2) and ma["sampling"] == mb["sampling"]
    assert sorted(p.name for p in (tmp_path / "multi" / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]


def test_merge_results_restores_image_order():
    def part(indices):
        idx = np.asarray(indices)
        images = np.broadcast_to(idx[:, None, None, None], (len(idx), 2, 2, 3)).astype(np.uint8)
        secs = {"stage1": float(len(idx)), "stage2": 0.0, "vq": 1.0}
        return GenerationResult(
            images, idx * 10, idx[:, None, None] + 100, secs, {"stage1": len(idx), "stage2": 0}, idx
        )

    merged = merge_results([part([0, 1, 4]), part([2, 3]), part([])])
    assert merged.indices.tolist() == [0, 1, 2, 3, 4] and merged.labels.tolist() == [0, 10, 20, 30, 40]
    assert merged.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4] and merged.tokens[:, 0, 0].tolist() == [
        100,
        101,
        102,
        103,
        104,
    ]
    assert merged.seconds == {"stage1": 3.0, "stage2": 0.0, "vq": 1.0} and merged.forward_passes["stage1"] == 5

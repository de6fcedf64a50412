"""`digit encoder pretrain` on a timm CNN (DINO on the final feature map), then `digit tokenizer fit` on its stride-16
feature map: the encoder directory round trip for CNNs."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import write_image_folder
from digit.cli import main

CNN = "tf_efficientnet_lite0"


def test_cli_pretrain_cnn_then_tokenizer_fit(tmp_path, capsys):
    import timm

    data = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), n_per_class=4, size=(40, 40))
    out = tmp_path / "enc"
    argv = ["encoder", "pretrain", "--data", str(data), "--encoder", CNN, "--image-size", "32", "--epochs", "1",
            "--batch-size", "8", "--val-fraction", "0.25", "--local-crops", "1", "--out-dim", "64", "--hidden-dim",
            "32", "--bottleneck-dim", "16", "--num-workers", "0", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    run_cfg = json.loads((out / "config.json").read_text())["dino"]
    assert run_cfg["local_size"] == 14  # 32 * 96 / 224, no patch rounding for a CNN
    assert run_cfg["crops"]["mean"] == [0.5, 0.5, 0.5] and run_cfg["crops"]["std"] == [0.5, 0.5, 0.5]
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["name"] == CNN and meta["image_size"] == 32
    weights = load_file(out / "encoder.safetensors")
    torch.manual_seed(0)  # the task's seed: the student's random init
    init = timm.create_model(CNN).state_dict()
    assert set(weights) == set(init)
    assert not torch.equal(weights["conv_stem.weight"], init["conv_stem.weight"])  # trained (EMA teacher moved)

    tok = tmp_path / "tok"
    fit = ["tokenizer", "fit", "--data", str(data), "--encoder", str(out), "--clusters", "4", "--sample-frac", "1.0",
           "--workers", "0", "--out", str(tok)]  # fmt: skip
    assert main(fit) == 0
    cfg = json.loads((tok / "tokenizer.json").read_text())
    assert cfg["layer"] == "stride16" and cfg["grid"] == [2, 2] and cfg["encoder"]["family"] == "cnn"
    assert np.load(tok / "centroids.npy").shape == (4, 112)
    capsys.readouterr()
    bad = [*argv[:-1], str(tmp_path / "ibot"), "--ibot-weight", "1"]
    assert main(bad) == 2
    assert "iBOT" in capsys.readouterr().err

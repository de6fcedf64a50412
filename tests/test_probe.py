"""Linear probes: planted class signal is found on the right layer, directly and end to end through `digit probe`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from digit.cli import main
from digit.errors import DigitError
from digit.evaluation.probe import extract_gpt_features, layer_names, summarize, train_linear_probes


def _planted(n, seed, layers=3, signal_layer=1, d=16, classes=4):
    """[L, n, d] Gaussian noise; only ``signal_layer`` has class-dependent means (well separated)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = rng.normal(size=(layers, n, d)).astype(np.float32) * 2.0 + 5.0  # offset/scale: standardisation must cope
    means = np.random.default_rng(123).normal(size=(classes, d)) * 3.0
    x[signal_layer] += means[y].astype(np.float32)
    return x, y


@pytest.mark.converge
def test_probe_trainer_recovers_planted_signal():
    xt, yt = _planted(800, 0)
    xv, yv = _planted(400, 1)
    res = train_linear_probes(xt, yt, xv, yv, 4, epochs=10, lr=0.4, batch_size=128, seed=0)
    acc = res["val_top1"]
    assert len(acc) == 3 and acc[1] > 0.95
    assert acc[0] < 0.45 and acc[2] < 0.45  # chance is 0.25
    out = summarize([0, 1, 2], 3, res)
    assert out["best_layer"] == 1 and out["best_top1"] == acc[1]
    assert out["layers"][2]["is_last"] and not out["layers"][2]["official_probed"]
    assert out["best_official_layer"] == 1
    # seeded: the same call gives the same numbers
    again = train_linear_probes(xt, yt, xv, yv, 4, epochs=10, lr=0.4, batch_size=128, seed=0)
    assert again["val_top1"] == acc and again["train_loss"] == res["train_loss"]


def test_probe_trainer_rejects_bad_labels():
    xt, yt = _planted(50, 0)
    with pytest.raises(DigitError, match="labels must lie"):
        train_linear_probes(xt, yt - 1, xt, yt, 4, epochs=1)


def test_layer_names_and_selection():
    from digit.cli.probe import parse_layers

    assert layer_names(3) == ["embedding", "block 1", "block 2"]
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("2,0,2", 3) == [0, 2]
    with pytest.raises(DigitError, match=r"\[0, 2\]"):
        parse_layers("0,3", 3)


# ---- end to end on a tiny random GPT


def _tiny_run(tmp_path, cond="none"):
    from digit.models import build_config
    from digit.models.gpt import GPT
    from digit.utils.io import atomic_save_safetensors, atomic_write_json

    kw = {"cond": cond, "num_classes": 4} if cond == "class" else {}
    cfg = build_config("tiny", vocab_size=32, grid=(4, 4), n_layers=2, dim=32, n_heads=4, **kw)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    run = tmp_path / f"run_{cond}"
    atomic_write_json(run / "config.json", {"model": cfg.to_dict(), "train": {}, "data": {}, "task": "gpt"})
    atomic_save_safetensors(run / "model.safetensors", model.state_dict())
    return run, model


def _token_dir(path, n, seed):
    """Class c draws its 16 tokens from vocabulary block [8c, 8c+8): mean-pooled embeddings separate the classes."""
    from digit.data.tokens import write_token_dir

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    tokens = labels[:, None, None] * 8 + rng.integers(0, 8, size=(n, 4, 4))
    write_token_dir(path, tokens, labels, vocab_size=32, num_classes=4)
    return tokens, labels


def test_extracted_features_are_mean_pooled_hidden_states(tmp_path):
    _, model = _tiny_run(tmp_path)
    tokens, _ = _token_dir(tmp_path / "t", 10, 0)
    feats = extract_gpt_features(model, tokens, [0, 2], batch_size=4)
    assert feats.shape == (2, 10, 32) and feats.dtype == np.float32
    with torch.no_grad():
        states = model.hidden_states(torch.from_numpy(tokens.reshape(10, -1)).long())
    np.testing.assert_allclose(feats[0], states[0].mean(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats[1], states[2].mean(1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.converge
def test_probe_cli_end_to_end(tmp_path, capsys):
    run, _ = _tiny_run(tmp_path, cond="class")
    _token_dir(tmp_path / "train", 400, 1)
    _token_dir(tmp_path / "val", 200, 2)
    out, cache = tmp_path / "probe.json", tmp_path / "cache"
    argv = [
        "probe",
        "--run",
        str(run),
        "--tokens",
        str(tmp_path / "train"),
        "--val-tokens",
        str(tmp_path / "val"),
        "--epochs",
        "20",
        "--batch-size",
        "100",
        "--seed",
        "3",
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert [r["layer"] for r in res["layers"]] == [0, 1, 2]
    assert [r["name"] for r in res["layers"]] == ["embedding", "block 1", "block 2"]
    assert res["layers"][0]["top1"] > 0.95  # the planted signal lives in the token embeddings
    assert res["layers"][2]["is_last"] and not res["layers"][2]["official_probed"]
    assert res["best_top1"] == max(r["top1"] for r in res["layers"])
    prov = res["provenance"]
    assert prov["num_classes"] == 4 and prov["tokens"]["n_train"] == 400 and prov["condition"] == "null class"
    assert len(prov["weights_sha256"]) == 64 and prov["probe"]["seed"] == 3
    assert (cache / "train_features.npy").is_file() and np.load(cache / "val_features.npy").shape == (3, 200, 32)
    printed = json.loads(capsys.readouterr().out)
    assert printed["best_layer"] == res["best_layer"]
    # second run reuses the cached features and reproduces the result; a layer subset is accepted
    assert main(argv) == 0
    assert json.loads(out.read_text())["layers"] == res["layers"]
    # --train-limit: a seeded subset drawn from every class (token directories are class-sorted), recorded; the
    # cache keyed on the subset is refreshed rather than reused
    limited = [*argv[:-2], "--train-limit", "120", "--out", str(tmp_path / "limited.json")]
    assert main(limited) == 0
    lim = json.loads((tmp_path / "limited.json").read_text())
    assert lim["provenance"]["tokens"]["n_train"] == 120 and lim["provenance"]["tokens"]["n_train_available"] == 400
    assert np.load(cache / "train_features.npy").shape == (3, 120, 32)
    assert lim["layers"][0]["top1"] > 0.9  # 120 rows over all 4 classes still find the planted signal
    # a --flip val directory: each image is scored once, on its original view (the mirrored grids here carry the
    # next class's tokens, so counting them would pull top-1 down)
    from digit.data.tokens import write_token_dir

    tokens, labels = _token_dir(tmp_path / "val_again", 200, 2)  # the val set above
    mirrored = (labels[:, None, None] + 1) % 4 * 8 + np.random.default_rng(5).integers(0, 8, size=(200, 4, 4))
    write_token_dir(tmp_path / "val_flip", np.concatenate([tokens, mirrored]), np.concatenate([labels, labels]),
                    vocab_size=32, num_classes=4, views=["orig", "flip"])  # fmt: skip
    i = argv.index("--val-tokens") + 1
    flip_argv = [*argv[:i], str(tmp_path / "val_flip"), *argv[i + 1 : -2], "--out", str(tmp_path / "flip.json")]
    assert main(flip_argv) == 0
    fl = json.loads((tmp_path / "flip.json").read_text())
    assert fl["provenance"]["tokens"]["n_val"] == 200 and fl["layers"] == res["layers"]


def test_probe_cli_errors(tmp_path, capsys):
    from digit.data.tokens import write_token_dir

    run, _ = _tiny_run(tmp_path)
    _token_dir(tmp_path / "train", 20, 1)
    write_token_dir(tmp_path / "unlabeled", np.zeros((5, 4, 4), np.int64), None, vocab_size=32)
    write_token_dir(tmp_path / "grid", np.zeros((5, 2, 2), np.int64), np.zeros(5), vocab_size=32)
    base = ["probe", "--run", str(run), "--tokens", str(tmp_path / "train")]
    assert main([*base, "--val-tokens", str(tmp_path / "unlabeled")]) == 2
    assert "labeled" in capsys.readouterr().err
    assert main([*base, "--val-tokens", str(tmp_path / "grid")]) == 2
    assert "grid" in capsys.readouterr().err
    assert main([*base, "--val-tokens", str(tmp_path / "train"), "--layers", "0,7"]) == 2
    assert "[0, 2]" in capsys.readouterr().err

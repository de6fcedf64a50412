"""`digit tokenizer knn`: weighted kNN top-1 on a tokenizer's mean-pooled features, against the formula written out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_fit_argv, write_image_folder
from digit.cli import main
from digit.data.datasets import ImageDataset
from digit.data.sources import open_image_source
from digit.tokenizers import load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:RANDOM-INIT")
CLASSES = ("red", "green", "blue")


def pooled(tok, folder) -> tuple[np.ndarray, np.ndarray]:
    src = open_image_source(folder)
    ds = ImageDataset(src, tok.image_size)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.inference_mode():
        f = tok.features(tok.normalize(x)).float().mean(1)
    return f.numpy().astype(np.float64), np.array([ds[i][1] for i in range(len(ds))])


def knn_by_hand(bank, bank_y, queries, query_y, k, temperature, n_classes) -> float:
    """Cosine similarity, the k most similar bank rows vote for their class with weight exp(sim / T)."""
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    right = 0
    for q, y in zip(queries, query_y):
        sim = b @ (q / np.linalg.norm(q))
        votes = np.zeros(n_classes)
        for j in np.argsort(-sim, kind="stable")[:k]:
            votes[bank_y[j]] += np.exp(sim[j] / temperature)
        right += int(votes.argmax() == y)
    return right / len(query_y)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    bank = write_image_folder(root / "bank", classes=CLASSES, n_per_class=6, size=(32, 32), seed=0)
    val = write_image_folder(root / "val", classes=CLASSES, n_per_class=4, size=(32, 32), seed=1)
    tok = root / "tok"
    assert main(tiny_fit_argv(bank, tok, 4, "--smooth", "3")) == 0
    return root, bank, val, tok


def test_knn_equals_the_formula_on_the_smoothed_features(setup, capsys):
    root, bank, val, tok_dir = setup
    out = root / "knn.json"
    argv = ["tokenizer", "knn", "--tokenizer", str(tok_dir), "--bank-data", str(bank), "--data", str(val), "--k", "5",
            "--workers", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(out.read_text())
    tok = load_tokenizer(tok_dir)
    assert tok.smooth == 3  # the features K-means saw: smoothed, then layer-normed
    bank_x, bank_y = pooled(tok, bank)
    val_x, val_y = pooled(tok, val)
    want = knn_by_hand(bank_x, bank_y, val_x, val_y, 5, 0.07, len(CLASSES))
    assert res["knn_top1"] == pytest.approx(want, abs=1e-9) and res["bank"] == 18 and res["queries"] == 12
    assert want > 1 / len(CLASSES)  # colour classes are separable even by a random ViT: the figure is not chance
    assert f"kNN top-1 {want:.2%}" in capsys.readouterr().out
    # a seeded bank subset: the same rows as numpy's choice with that seed, and the same figure every time
    sub = ["tokenizer", "knn", "--tokenizer", str(tok_dir), "--bank-data", str(bank), "--data", str(val), "--k", "5",
           "--bank", "7", "--seed", "3", "--workers", "0", "--out", str(root / "sub.json")]  # fmt: skip
    assert main(sub) == 0
    got = json.loads((root / "sub.json").read_text())
    keep = np.sort(np.random.default_rng(3).choice(18, 7, replace=False))
    assert got["bank"] == 7 and got["bank_seed"] == 3
    want_sub = knn_by_hand(bank_x[keep], bank_y[keep], val_x, val_y, 5, 0.07, len(CLASSES))
    assert got["knn_top1"] == pytest.approx(want_sub, abs=1e-9)


def test_knn_refuses_unlabelled_or_mismatched_data(setup, tmp_path, capsys):
    _, bank, val, tok_dir = setup
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((val / "red").iterdir()):
        (flat / p.name).write_bytes(p.read_bytes())
    base = ["tokenizer", "knn", "--tokenizer", str(tok_dir), "--bank-data", str(bank), "--workers", "0"]
    assert main([*base, "--data", str(flat)]) == 2
    assert "has no class labels" in capsys.readouterr().err
    other = write_image_folder(tmp_path / "other", classes=("red", "violet"), n_per_class=2, size=(32, 32))
    assert main([*base, "--data", str(other)]) == 2
    assert "--data has classes the bank lacks: violet" in capsys.readouterr().err
    assert main(["tokenizer", "knn", "--tokenizer", str(tmp_path), "--bank-data", str(bank), "--data", str(val)]) == 2


def test_queries_with_fewer_classes_are_mapped_onto_the_bank_by_name(setup, tmp_path):
    _, bank, val, tok_dir = setup
    names = sorted(CLASSES)  # blue 0, green 1, red 2 in the bank
    sub = tmp_path / "sub"
    for name in ("green", "red"):  # 0 and 1 in this folder: read as the bank's blue and green unless mapped
        (sub / name).mkdir(parents=True)
        for p in sorted((val / name).iterdir()):
            (sub / name / p.name).write_bytes(p.read_bytes())
    tok = load_tokenizer(tok_dir)
    bank_x, bank_y = pooled(tok, bank)
    val_x, val_y = pooled(tok, val)
    rows = np.isin(val_y, [names.index("green"), names.index("red")])
    out = tmp_path / "sub.json"
    argv = ["tokenizer", "knn", "--tokenizer", str(tok_dir), "--bank-data", str(bank), "--data", str(sub),
            "--k", "5", "--workers", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    want = knn_by_hand(bank_x, bank_y, val_x[rows], val_y[rows], 5, 0.07, len(CLASSES))
    assert json.loads(out.read_text())["knn_top1"] == pytest.approx(want, abs=1e-9) and want > 0.5

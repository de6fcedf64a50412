"""`digit text-encoder build`: the offline text encoder (tokenizer trained on captions + a small random-init T5) loads
through the same T5TextEncoder path as FLAN-T5, is seeded, says plainly that it is not pretrained, and refuses bad
input. Nothing is downloaded: everything is built from the test's own captions."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")  # in the dev extra (CI installs it); the rest of digit runs without it

from digit.cli import main  # noqa: E402
from digit.data.scenes import ScenesConfig, write_scenes  # noqa: E402
from digit.data.text_features import T5TextEncoder, load_text_encoder  # noqa: E402


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, ScenesConfig(n=40, n_classifier=2, n_test=2, n_prompts=2, seed=0))
    return root / "train"


def _build(captioned, out, *extra) -> int:
    return main(["text-encoder", "build", "--captions", str(captioned), "--d-model", "32", "--heads", "2",
                 "--layers", "1", *map(str, extra), "--out", str(out)])  # fmt: skip


def test_built_encoder_loads_as_t5_and_matches_the_model(captioned, tmp_path):
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    out = tmp_path / "te"
    assert _build(captioned, out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "not pretrained" in cfg["digit_text_encoder"]["note"] and cfg["d_model"] == 32
    assert "not pretrained" in (out / "README.md").read_text()
    enc = load_text_encoder(out, max_length=20)
    assert isinstance(enc, T5TextEncoder)
    texts = ["a large red circle to the left of a small blue square", "a small green triangle on the right"]
    feats, mask = enc.encode(texts)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok(texts)["input_ids"]
    assert [i[-1] for i in ids] == [1, 1]  # T5's </s> appended
    assert all(tok.unk_token_id not in i for i in ids)  # every caption word is in the trained vocabulary
    assert mask.sum(1).tolist() == [len(i) for i in ids] and feats.shape == (2, 20, 32)
    assert not feats[~mask].any()
    model = T5EncoderModel.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids[1]])).last_hidden_state[0].numpy()
    np.testing.assert_allclose(feats[1, : len(ids[1])], ref, atol=1e-5)
    # words differ -> features differ; the same text -> the same features
    assert not np.allclose(feats[0, :3], feats[1, :3])
    np.testing.assert_array_equal(enc.encode(texts[:1])[0][0], feats[0])


def test_build_is_seeded(captioned, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert _build(captioned, tmp_path / name, "--seed", seed) == 0
    ident = {n: load_text_encoder(tmp_path / n, max_length=8).identity()["sha256"] for n in "abc"}
    assert ident["a"] == ident["b"] != ident["c"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "c" / "tokenizer.json").read_bytes()


def test_build_refusals(captioned, tmp_path, capsys):
    from digit.data.synthetic import write_shapes_dataset

    plain = write_shapes_dataset(tmp_path / "plain", n_classes=1, per_class=2, size=16)
    cases = [
        (["text-encoder", "build", "--captions", str(plain), "--out", str(tmp_path / "x")], "no captions in"),
        (
            [
                "text-encoder",
                "build",
                "--captions",
                str(captioned),
                "--d-model",
                "30",
                "--heads",
                "4",
                "--out",
                str(tmp_path / "y"),
            ],
            "multiple of --heads",
        ),  # fmt: skip
        (
            ["text-encoder", "build", "--captions", str(captioned), "--vocab-size", "2", "--out", str(tmp_path / "z")],
            "too small",
        ),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "digit text-encoder: error:" in err and msg in err and "Traceback" not in err, err
    for d in ("x", "y", "z"):
        assert not (tmp_path / d).exists()  # nothing half-written

"""Captioned image sources (sidecar .txt, metadata.jsonl, WebDataset tars) and caption features beside token dirs."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import tar_folder, write_image_folder
from digit.data.captions import read_captions, with_captions
from digit.data.datasets import SkipReport
from digit.data.sources import open_image_source
from digit.data.text_features import (
    RandomTextEncoder,
    T5TextEncoder,
    TextEncoder,
    read_caption_features,
    write_caption_features,
)
from digit.data.tokens import write_token_dir
from digit.errors import DigitError


def _caption(key: str) -> str:
    return f"a picture called {key}"


def _png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _sidecar_folder(root, classes=("dog", "cat"), n=3):
    write_image_folder(root, classes=classes, n_per_class=n)
    for p in root.rglob("*.png"):
        p.with_suffix(".txt").write_text(_caption(p.relative_to(root).as_posix()) + "\n")
    return root


def _image_keys(root) -> list[str]:
    """The image source of the folder with every caption file removed: the order the captions must follow."""
    return [e.key for e in open_image_source(root).entries if not e.key.endswith((".txt", ".jsonl"))]


def test_sidecar_imagefolder_aligned_with_source_order(tmp_path):
    root = _sidecar_folder(tmp_path / "d")
    src, texts = with_captions(open_image_source(root))
    assert [e.key for e in src.entries] == _image_keys(root)
    assert texts == [_caption(e.key) for e in src.entries]
    assert src.class_names == ["cat", "dog"] and list(src.labels) == [0, 0, 0, 1, 1, 1]
    assert SkipReport(src).skipped == []  # caption files are not counted as undecodable images
    # read_captions gives the caption of every entry of the raw source, None for the caption files themselves
    raw = open_image_source(root)
    caps = read_captions(raw)
    assert len(caps.texts) == len(raw)
    for e, t in zip(raw.entries, caps.texts):
        assert t == (None if e.key.endswith(".txt") else _caption(e.key))


def test_metadata_jsonl_flat_and_per_folder(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    names = [f"im{i}.png" for i in (3, 0, 2, 1)]
    for i, n in enumerate(names):
        (root / n).write_bytes(_png_bytes(i))
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"T{n}"}) + "\n" for n in names))
    src, texts = with_captions(open_image_source(root))
    assert [e.key for e in src.entries] == sorted(names)
    assert texts == [f"T{n}" for n in sorted(names)]
    assert not src.labeled and SkipReport(src).skipped == []

    # ImageFolder with a metadata file per class folder: file_name is relative to the metadata file's folder
    root2 = write_image_folder(tmp_path / "ifold", classes=("a", "b"), n_per_class=2)
    for c in ("a", "b"):
        recs = [{"file_name": p.name, "text": f"{c}:{p.name}"} for p in sorted((root2 / c).glob("*.png"))]
        (root2 / c / "metadata.jsonl").write_text("\n".join(map(json.dumps, recs)))
    src2, texts2 = with_captions(open_image_source(root2))
    assert texts2 == [e.key.replace("/", ":") for e in src2.entries] and len(texts2) == 4
    assert list(src2.labels) == [0, 0, 1, 1]


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_webdataset_tar_pairs(tmp_path, suffix):
    arc = tmp_path / f"shard{suffix}"
    keys = ["000007", "000002", "000005"]
    with tarfile.open(arc, "w:gz" if suffix.endswith("gz") else "w") as tf:
        for i, k in enumerate(keys):
            for name, data in ((f"{k}.jpg", _png_bytes(i)), (f"{k}.txt", f"caption {k}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    src, texts = with_captions(open_image_source(arc))
    assert [e.key for e in src.entries] == [f"{k}.jpg" for k in sorted(keys)]
    assert texts == [f"caption {k}" for k in sorted(keys)]
    # the narrowed source still reads the right bytes for each image (entries and members stay aligned)
    assert [src.read_bytes(i) for i in range(3)] == [_png_bytes(keys.index(k)) for k in sorted(keys)]
    assert sorted(i for i, _ in src.iter_bytes()) == [0, 1, 2]


def test_archive_of_sidecar_folder_equals_folder(tmp_path):
    root = _sidecar_folder(tmp_path / "d")
    arc = tar_folder(root, tmp_path / "d.tar.gz", top="train")
    a, ta = with_captions(open_image_source(root))
    b, tb = with_captions(open_image_source(arc))
    assert [e.key for e in a.entries] == [e.key for e in b.entries] and ta == tb


def test_missing_empty_and_orphan_captions_are_counted(tmp_path):
    root = _sidecar_folder(tmp_path / "d", classes=("x",), n=5)
    (root / "x" / "img_001.txt").unlink()  # missing
    (root / "x" / "img_002.txt").write_text("  \n")  # empty
    (root / "x" / "img_003.txt").write_bytes(b"\xff\xfe bad")  # not UTF-8
    (root / "x" / "stray.txt").write_text("no image for me")  # orphan caption
    (root / "x" / "broken.png").write_bytes(b"not a png")  # undecodable image, with a caption
    (root / "x" / "broken.txt").write_text("caption of a broken file")
    src, texts = with_captions(open_image_source(root, "imagefolder"))
    assert [e.key for e in src.entries] == ["x/broken.png", "x/img_000.png", "x/img_004.png"]
    assert texts == ["caption of a broken file", _caption("x/img_000.png"), _caption("x/img_004.png")]
    report = SkipReport(src)
    reasons = dict(report.skipped)
    assert set(reasons) == {"x/img_001.png", "x/img_002.png", "x/img_003.png", "x/stray.txt"}
    assert reasons["x/img_001.png"].startswith("no caption")
    assert reasons["x/img_002.png"] == "empty caption (x/img_002.txt)"
    assert "not UTF-8" in reasons["x/img_003.png"]
    assert reasons["x/stray.txt"] == "caption file without an image"
    report.add([(0, "undecodable (x)")])  # the undecodable image joins the same summary
    assert len(report) == 5 and report.summary().startswith("skipped 5 file(s)")
    with pytest.raises(DigitError, match="img_001.png: no caption"):
        SkipReport(src, strict=True)


def test_metadata_empty_text_and_unlisted_image_counted(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png_bytes(i))
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "0.png", "text": "zero"}) + "\n" + json.dumps({"file_name": "1.png", "text": ""})
    )
    src, texts = with_captions(open_image_source(root))
    assert texts == ["zero"] and [e.key for e in src.entries] == ["0.png"]
    assert dict(SkipReport(src).skipped) == {
        "1.png": "empty caption in metadata.jsonl",
        "2.png": "no caption (no sidecar .txt and not in any metadata.jsonl)",
    }


def test_no_captions_is_one_line_error(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("a",), n_per_class=2)
    with pytest.raises(DigitError, match=r"^no captions in .*metadata\.jsonl") as e:
        with_captions(open_image_source(root))
    assert "\n" not in str(e.value)
    for p in root.rglob("*.png"):
        p.with_suffix(".txt").write_text("")
    with pytest.raises(DigitError, match="no captioned image"):
        with_captions(open_image_source(root))


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "line 2: invalid JSON"),
        ('{"text": "no file name"}', "line 2: expected an object with a 'file_name'"),
        ('{"file_name": "0.png", "text": 5}', "line 2: 'text' must be a string"),
        ('{"file_name": "../0.png", "text": "x"}', "line 2: file_name '../0.png' is absolute or climbs out"),
    ],
)
def test_corrupt_metadata_refused_with_path_and_line(tmp_path, line, match):
    root = tmp_path / "m"
    root.mkdir()
    (root / "0.png").write_bytes(_png_bytes(0))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DigitError, match=f"metadata.jsonl: {match}") as e:
        with_captions(open_image_source(root))
    assert str(root) in str(e.value)


def test_hostile_tar_caption_members_never_read(tmp_path):
    arc = tmp_path / "h.tar"
    with tarfile.open(arc, "w") as tf:
        for i, k in enumerate(("a", "b", "c")):
            data = _png_bytes(i)
            info = tarfile.TarInfo(f"{k}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a.txt")  # a caption that is a link to a host file
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        hard = tarfile.TarInfo("b.txt")
        hard.type, hard.linkname = tarfile.LNKTYPE, "c.txt"
        tf.addfile(hard)
        for name in ("../c.txt", "c.txt"):
            data = f"caption via {name}".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    src, texts = with_captions(open_image_source(arc))
    assert [e.key for e in src.entries] == ["c.jpg"] and texts == ["caption via c.txt"]
    reasons = dict(SkipReport(src).skipped)
    assert reasons["a.jpg"].startswith("no caption") and reasons["b.jpg"].startswith("no caption")
    assert "link member" in reasons["a.txt"] and "link member" in reasons["b.txt"]
    assert "climbs" in reasons["../c.txt"]


def test_folder_caption_link_out_of_root_not_followed(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("host secret")
    root = _sidecar_folder(tmp_path / "d", classes=("x",), n=2)
    (root / "x" / "img_000.txt").unlink()
    (root / "x" / "img_000.txt").symlink_to(outside)
    src, texts = with_captions(open_image_source(root, "imagefolder"))
    assert "host secret" not in texts and texts == [_caption("x/img_001.png")]
    reasons = dict(SkipReport(src).skipped)
    assert "outside the data root" in reasons["x/img_000.txt"] and reasons["x/img_000.png"].startswith("no caption")


# ----------------------------------------------------------------------------------------------- features


def _token_dir(tmp_path, n=4, views=("orig",)):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 8, (n * len(views), 2, 2))
    return write_token_dir(tmp_path / "tok", tokens, None, vocab_size=8, views=list(views))


def test_random_encoder_is_deterministic_and_masked():
    enc = RandomTextEncoder(dim=6, max_length=10, seed=3)
    assert isinstance(enc, TextEncoder)
    f, m = enc.encode(["ab", "", "a longer caption than ten bytes"])
    assert f.shape == (3, 10, 6) and m.shape == (3, 10) and m.dtype == bool
    assert m.sum(1).tolist() == [2, 0, 10]
    np.testing.assert_array_equal(f[0, 0], enc.table[ord("a")] + enc.pos[0])
    assert not f[~m].any()  # padded positions are zero
    f2, _ = RandomTextEncoder(dim=6, max_length=10, seed=3).encode(["ab"])
    np.testing.assert_array_equal(f2[0], f[0])
    assert enc.identity()["sha256"] != RandomTextEncoder(dim=6, max_length=10, seed=4).identity()["sha256"]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_caption_features_round_trip(tmp_path, dtype):
    d = _token_dir(tmp_path, n=5, views=("orig", "flip"))
    texts = ["a red circle", "ünïcödé caption", "x", "a b c", "the last one"]
    enc = RandomTextEncoder(dim=8, max_length=12, seed=1)
    write_caption_features(d, texts, enc, batch_size=2, dtype=dtype)
    cf = read_caption_features(d, expect_encoder=enc.identity())
    want_f, want_m = enc.encode(texts)
    assert cf.texts == texts and cf.encoder == enc.identity()
    assert cf.features.dtype == np.dtype(dtype) and isinstance(cf.features, np.memmap)
    np.testing.assert_array_equal(cf.features, want_f.astype(dtype))
    np.testing.assert_array_equal(cf.mask, want_m)
    assert read_caption_features(d, mmap=False).features.shape == (5, 12, 8)
    with pytest.raises(DigitError, match="made by text encoder"):
        read_caption_features(d, expect_encoder=RandomTextEncoder(dim=8, max_length=12, seed=2).identity())
    with pytest.raises(DigitError, match="4 captions for 5 images"):
        write_caption_features(d, texts[:4], enc)


def test_missing_features_and_corrupt_files_refused_with_path(tmp_path):
    d = _token_dir(tmp_path, n=3)
    with pytest.raises(DigitError, match="no caption features"):
        read_caption_features(d)
    enc = RandomTextEncoder(dim=4, max_length=5)
    write_caption_features(d, ["a", "b", "c"], enc)
    (d / "text_mask.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DigitError, match=r"text_mask\.npy: not a readable \.npy"):
        read_caption_features(d)
    np.save(d / "text_mask.npy", np.ones((3, 5), dtype=np.float32))
    with pytest.raises(DigitError, match=r"text_mask\.npy: text mask array must have an boolean dtype"):
        read_caption_features(d)
    np.save(d / "text_mask.npy", np.ones((3, 4), dtype=bool))
    with pytest.raises(DigitError, match=r"text_mask\.npy: shape \[3, 4\] differs"):
        read_caption_features(d)
    np.save(d / "text_mask.npy", np.ones((3, 5), dtype=bool))
    np.save(d / "text_features.npy", np.ones((3, 5, 4), dtype=np.int16))
    with pytest.raises(DigitError, match=r"text_features\.npy: text feature array must have an float dtype"):
        read_caption_features(d)
    np.save(d / "text_features.npy", np.ones((2, 5, 4), dtype=np.float16))
    with pytest.raises(DigitError, match=r"text_features\.npy: shape \[2, 5, 4\] differs"):
        read_caption_features(d)
    np.save(d / "text_features.npy", np.ones((3, 5, 4), dtype=np.float16))
    (d / "captions.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DigitError, match=r"captions\.jsonl: 2 captions, meta.json says 3"):
        read_caption_features(d)
    (d / "captions.jsonl").write_text('{"text": "a"}\n{"txt": 1}\n{"text": "c"}\n')
    with pytest.raises(DigitError, match=r"captions\.jsonl: line 2: expected an object"):
        read_caption_features(d)
    (d / "captions.jsonl").write_bytes(b"\xff\n")
    with pytest.raises(DigitError, match=r"captions\.jsonl: not UTF-8"):
        read_caption_features(d)


def test_t5_loader_without_transformers_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *a, **kw):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(DigitError, match="pip install transformers"):
        T5TextEncoder(tmp_path)


# ----------------------------------------------------------------------------------------------- digit tokenize


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny random-init discriminative tokenizer (random centroids, no fitting), as in test_outputs."""
    from conftest import TINY_IMAGE_SIZE, TINY_VIT, TINY_VIT_KWARGS
    from digit.cli import main

    d = tmp_path_factory.mktemp("tok")
    np.save(d / "km.npy", np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32))
    argv = ["tokenizer", "from-centroids", "--centroids", str(d / "km.npy"), "--encoder", TINY_VIT,
            "--encoder-kwargs", json.dumps(TINY_VIT_KWARGS), "--random-init", "--image-size", str(TINY_IMAGE_SIZE),
            "--layer", "1", "--out", str(d / "tokenizer")]  # fmt: skip
    assert main(argv) == 0
    return d / "tokenizer"


def test_cli_tokenize_captions_skips_uncaptioned_and_undecodable(tokenizer_dir, tmp_path, capsys):
    from digit.cli import main
    from digit.data.tokens import read_token_dir

    root = _sidecar_folder(tmp_path / "d", classes=("a", "b"), n=3)
    (root / "a" / "img_001.txt").unlink()  # no caption: skipped and counted
    (root / "b" / "img_000.png").write_bytes(b"garbage")  # has a caption, but is not an image: skipped and counted
    enc_dir = tmp_path / "enc"
    enc_dir.mkdir()
    (enc_dir / "text_encoder.json").write_text(
        json.dumps({"kind": "random-test", "dim": 8, "max_length": 40, "seed": 5})
    )
    out = tmp_path / "tok"
    argv = ["tokenize", "--tokenizer", str(tokenizer_dir), "--data", str(root), "--workers", "0"]
    assert main([*argv, "--captions", "--text-encoder", str(enc_dir), "--flip", "--out", str(out)]) == 0
    assert "skipped 2 file(s)" in capsys.readouterr().out
    tok = read_token_dir(out)
    cf = read_caption_features(out, expect_encoder=RandomTextEncoder(8, 40, 5).identity())
    kept = ["a/img_000.png", "a/img_002.png", "b/img_001.png", "b/img_002.png"]
    assert tok.n_images == 4 and len(tok) == 8 and cf.texts == [_caption(k) for k in kept]
    assert list(tok.labels) == [0, 0, 1, 1] * 2
    want, mask = RandomTextEncoder(8, 40, 5).encode(cf.texts)
    np.testing.assert_array_equal(cf.features, want.astype(np.float16))
    np.testing.assert_array_equal(cf.mask, mask)
    skipped = {s["file"] for s in tok.meta["source"]["skipped"]}
    assert skipped == {"a/img_001.png", "b/img_000.png"}
    # the output with caption files is still this command's own: a rerun replaces it, here without captions
    assert main([*argv, "--out", str(out)]) == 0
    assert not (out / "text_features.npy").exists() and "text" not in read_token_dir(out).meta

    plain = write_image_folder(tmp_path / "plain", classes=("a",), n_per_class=2)
    assert (
        main([*argv[:4], str(plain), "--captions", "--text-encoder", str(enc_dir), "--out", str(tmp_path / "o2")]) == 2
    )
    err = capsys.readouterr().err
    assert "error: no captions in" in err and "Traceback" not in err
    assert main([*argv, "--captions", "--out", str(tmp_path / "o3")]) == 2
    assert "--captions and --text-encoder DIR go together" in capsys.readouterr().err


def test_t5_encoder_from_local_dir_matches_transformers(tmp_path):
    """Runs where `transformers` is installed (not a dependency of digit): a tiny random T5 saved locally, loaded by
    directory; features equal the model's own output on the valid positions, zero and masked on the padded ones."""
    pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from digit.data.text_features import load_text_encoder

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator(["a red circle", "a blue square left of"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=16, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, pad_token_id=0)
    model = T5EncoderModel(cfg).eval()
    model.save_pretrained(tmp_path)
    enc = load_text_encoder(tmp_path, max_length=6)
    feats, mask = enc.encode(["a red circle", "a blue square left of a red circle"])
    assert feats.shape == (2, 6, 16) and mask.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert not feats[~mask].any()
    with torch.no_grad():
        ref = model(**fast(["a red circle"], return_tensors="pt")).last_hidden_state[0].numpy()
    np.testing.assert_allclose(feats[0, :3], ref, atol=1e-5)
    ident = enc.identity()
    assert ident["kind"] == "t5" and ident == load_text_encoder(tmp_path, max_length=6).identity()


def test_encoder_with_inconsistent_shapes_refused_and_nothing_left(tmp_path):
    class Drifting(RandomTextEncoder):  # a second batch with another length: a broken encoder
        def encode(self, texts):
            f, m = super().encode(texts)
            self.calls = getattr(self, "calls", 0) + 1
            return (f, m) if self.calls == 1 else (f[:, :-1], m[:, :-1])

    d = _token_dir(tmp_path, n=3)
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(DigitError, match=r"text encoder returned features \[1, 3, 4\] and mask \[1, 3\] for 1"):
        write_caption_features(d, ["a", "b", "c"], Drifting(dim=4, max_length=4), batch_size=2)
    assert sorted(p.name for p in d.iterdir()) == before  # no temp file, no half-written features

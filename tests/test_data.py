"""Data layer: sources (folder / flat / tar / tar.gz), robust decoding of every odd case, preprocessing."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tar_folder, write_image_folder
from digit.data import decode as decode_mod
from digit.data.datasets import ImageDataset, SkipReport, StreamingImageDataset, image_loader, spread_indices
from digit.data.decode import BadImage, decode_image
from digit.data.sources import open_image_source
from digit.data.transforms import item_rng, preprocess
from digit.errors import DigitError


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_imagefolder_order_and_labels(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("zebra", "ant", "mole"), n_per_class=3)
    src = open_image_source(root)
    assert src.class_names == ["ant", "mole", "zebra"]
    assert src.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [e.key for e in src.entries][:3] == ["ant/img_000.png", "ant/img_001.png", "ant/img_002.png"]
    assert src.read_bytes(0) == (root / "ant" / "img_000.png").read_bytes()


def test_flat_folder_is_unlabeled_and_hidden_files_ignored(tmp_path):
    root = tmp_path / "flat"
    write_image_folder(tmp_path / "tmp", classes=("x",), n_per_class=3)
    root.mkdir()
    for p in (tmp_path / "tmp" / "x").iterdir():
        p.rename(root / p.name)
    (root / ".DS_Store").write_bytes(b"junk")
    src = open_image_source(root)
    assert not src.labeled and src.labels.tolist() == [-1, -1, -1]
    assert len(src) == 3


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_archive_equals_folder(tmp_path, suffix):
    root = write_image_folder(tmp_path / "d", classes=("b", "a"), n_per_class=3)
    arc = tar_folder(root, tmp_path / f"data{suffix}", top="train")  # single top folder is unwrapped
    f_src, t_src = open_image_source(root), open_image_source(arc)
    assert [e.key for e in t_src.entries] == [e.key for e in f_src.entries]
    assert t_src.class_names == f_src.class_names == ["a", "b"]
    assert np.array_equal(t_src.labels, f_src.labels)
    for i in range(len(f_src)):
        assert t_src.read_bytes(i) == f_src.read_bytes(i)
    streamed = dict(t_src.iter_bytes())
    assert sorted(streamed) == list(range(len(f_src)))
    assert all(streamed[i] == f_src.read_bytes(i) for i in streamed)


def test_folder_with_single_top_dir_is_unwrapped(tmp_path):
    write_image_folder(tmp_path / "outer" / "train", classes=("a", "b"), n_per_class=2)
    src = open_image_source(tmp_path / "outer")
    assert src.class_names == ["a", "b"]


def test_empty_and_missing_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DigitError, match="no files"):
        open_image_source(tmp_path / "empty")
    with pytest.raises(DigitError, match="does not exist"):
        open_image_source(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(DigitError, match="neither a folder nor"):
        open_image_source(tmp_path / "file.txt")


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("L", 77, (77, 77, 77)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 257 * 10, (10, 10, 10)),
    ],
)
def test_modes_become_rgb(mode, value, expected):
    img = Image.new(mode, (6, 5), value)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (6, 5)
    assert np.asarray(out)[2, 3].tolist() == list(expected)


def test_alpha_and_palette_composite_on_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(decode_image(_png(rgba)))
    assert out[0, 0].tolist() == [10, 20, 30] and out[3, 3].tolist() == [255, 255, 255]
    la = Image.new("LA", (3, 3), (50, 255))
    assert np.asarray(decode_image(_png(la)))[1, 1].tolist() == [50, 50, 50]
    p = Image.new("P", (3, 3), 1)
    p.putpalette([0, 0, 0, 9, 99, 199] + [0] * 762)
    assert np.asarray(decode_image(_png(p)))[0, 0].tolist() == [9, 99, 199]
    p.info["transparency"] = 1
    assert np.asarray(decode_image(_png(p, transparency=1)))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_applied():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    img.paste((0, 0, 255), (10, 0, 20, 10))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue())
    assert out.size == (10, 20)
    a = np.asarray(out).astype(int)
    assert a[2, 5, 0] > 200 and a[17, 5, 2] > 200  # red on top, blue at the bottom after rotation


def test_bad_bytes_raise_badimage(monkeypatch):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    with pytest.raises(BadImage, match="undecodable"):
        decode_image(good.getvalue()[: len(good.getvalue()) // 2])  # truncated
    with pytest.raises(BadImage, match="not an image"):
        decode_image(b"just some text")
    monkeypatch.setattr(decode_mod, "MAX_PIXELS", 100)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(_png(Image.new("RGB", (20, 20))))


def test_skipped_files_counted_once_and_strict_names_file(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("a", "b"), n_per_class=2)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 10)
    (root / "README").write_text("loose file")
    src = open_image_source(root)
    ds = ImageDataset(src, 32)
    report = SkipReport(src)
    n_good = 0
    for b in image_loader(ds, batch_size=3):
        report.add(b["failures"])
        n_good += len(b["indices"])
    assert n_good == 4 and len(report) == 3
    assert {k for k, _ in report.skipped} == {"a/notes.txt", "b/broken.jpg", "README"}
    assert "skipped 3 file(s)" in report.summary()
    with pytest.raises(DigitError, match="README"):
        SkipReport(src, strict=True)


def test_preprocess_center_and_seeded_random_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8))
    t = preprocess(img, 16)
    assert t.shape == (3, 16, 16) and t.dtype == torch.uint8
    a = preprocess(img, 16, train=True, rng=item_rng(1, 0, 5))
    b = preprocess(img, 16, train=True, rng=item_rng(1, 0, 5))
    assert torch.equal(a, b)
    crops = {preprocess(img, 16, train=True, rng=item_rng(s, 0, 5)).sum().item() for s in range(8)}
    assert len(crops) > 1


def test_streaming_covers_each_index_once_with_workers(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("a", "b", "c"), n_per_class=3)
    arc = tar_folder(root, tmp_path / "d.tar.gz")
    src = open_image_source(arc)
    seen = []
    for b in image_loader(StreamingImageDataset(src, 24), batch_size=2, workers=2):
        seen.extend(b["indices"].tolist())
    assert sorted(seen) == list(range(9))
    direct = ImageDataset(open_image_source(root), 24)[4][0]
    streamed = next(x for x in StreamingImageDataset(src, 24) if x[2] == 4)[0]
    assert torch.equal(direct, streamed)


def test_a_limit_takes_images_spread_over_the_source_with_every_class(tmp_path):
    assert (
        spread_indices(10, 4) == [0, 2, 5, 7]
        and spread_indices(3, 5) == [0, 1, 2]
        and spread_indices(4, None) == [0, 1, 2, 3]
    )
    assert spread_indices(45000, 1000)[:3] == [0, 45, 90] and len(set(spread_indices(7, 6))) == 6
    root = write_image_folder(tmp_path / "d", classes=("a", "b", "c"), n_per_class=4)  # listed class by class
    arc = tar_folder(root, tmp_path / "d.tar.gz")
    for src in (open_image_source(root), open_image_source(arc)):
        ds = StreamingImageDataset(src, 24, limit=5)
        assert len(ds) == 5
        for workers in (0, 2):
            got = {}
            for b in image_loader(ds, batch_size=2, workers=workers):
                got.update(zip(b["indices"].tolist(), b["labels"].tolist(), strict=True))
            assert sorted(got) == [0, 2, 4, 7, 9]  # k * 12 // 5
            assert sorted(set(got.values())) == [0, 1, 2]  # the first 5 would have missed class c


def test_dataset_survives_missing_file(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("a",), n_per_class=2)
    src = open_image_source(root)
    Path(root / "a" / "img_001.png").unlink()
    img, label, idx, err = ImageDataset(src, 16)[1]
    assert img is None and idx == 1 and "unreadable" in err


def test_synthetic_shapes_dataset_is_seeded_imagefolder(tmp_path):
    from digit.data.synthetic import write_shapes_dataset

    a = write_shapes_dataset(tmp_path / "a", n_classes=6, per_class=2, size=24, seed=3)
    b = write_shapes_dataset(tmp_path / "b", n_classes=6, per_class=2, size=24, seed=3)
    src = open_image_source(a)
    assert len(src) == 12 and len(src.class_names) == 6 and sorted(set(src.labels.tolist())) == list(range(6))
    assert all(src.read_bytes(i) == open_image_source(b).read_bytes(i) for i in range(12))
    img = decode_image(src.read_bytes(0))
    assert img.size == (24, 24) and np.asarray(img).std() > 10


def test_single_class_imagefolder_keeps_its_class(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("cat",), n_per_class=3)
    src = open_image_source(root, layout="imagefolder")
    assert src.class_names == ["cat"] and src.labels.tolist() == [0, 0, 0]
    assert open_image_source(root).labels.tolist() == [-1, -1, -1]  # auto: a lone folder of files is a flat set
    arc = tar_folder(root, tmp_path / "d.tar", top="train")
    assert open_image_source(arc, layout="imagefolder").class_names == ["cat"]


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_tar_duplicate_names_keep_the_last_copy(tmp_path, suffix):
    import tarfile

    first, second = _png(Image.new("RGB", (4, 4), (1, 1, 1))), _png(Image.new("RGB", (4, 4), (9, 9, 9)))
    arc = tmp_path / f"dup{suffix}"
    with tarfile.open(arc, "w:gz" if suffix == ".tar.gz" else "w") as tf:
        for name, data in (("a/x.png", first), ("a/y.png", first), ("a/x.png", second), ("b/z.png", first)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    src = open_image_source(arc)
    assert [e.key for e in src.entries] == ["a/x.png", "a/y.png", "b/z.png"]
    assert src.read_bytes(0) == second
    assert dict(src.iter_bytes()) == {0: second, 1: first, 2: first}


def test_unreadable_file_is_skipped_when_streaming(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("a",), n_per_class=4)
    src = open_image_source(root)
    (root / "a" / "img_003.png").unlink()  # gone between listing and reading
    got = {i: err for _, _, i, err in StreamingImageDataset(src, 16)}
    assert sorted(got) == [0, 1, 2, 3] and "unreadable" in got[3] and got[0] is None


def test_outputs_get_umask_permissions(tmp_path):
    import os
    import stat

    from digit.data.tokens import write_token_dir

    old = os.umask(0o022)
    try:
        out = write_token_dir(tmp_path / "t", np.zeros((2, 2, 2), np.int64), None, vocab_size=4)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "tokens.npy").stat().st_mode) == 0o644


# ---- hostile layouts: links and archive members never mislabel, never vanish uncounted (sources.py docstring)


def test_symlink_loop_reads_each_file_once_with_its_own_label(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("a", "b"), n_per_class=3)
    (root / "a" / "loop").symlink_to("..")  # cls/loop -> .. : os.walk(followlinks=True) descended 40 levels
    (root / "b" / "again").symlink_to(root / "b")
    src = open_image_source(root)
    assert [e.key for e in src.entries] == [f"{c}/img_{i:03d}.png" for c in "ab" for i in range(3)]
    assert src.class_names == ["a", "b"] and src.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert [k for k, _ in src.rejected] == ["a/loop", "b/again"]
    assert all("folder already read" in r for _, r in src.rejected)
    report = SkipReport(src)
    assert len(report) == 2 and report.summary().startswith("skipped 2 file(s): a/loop: link to a folder")


def test_links_resolving_outside_the_root_are_not_followed_and_duplicates_are_read_once(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=("a", "b"), n_per_class=2)
    outside = write_image_folder(tmp_path / "private", classes=("secret",), n_per_class=2)
    (root / "a" / "leak.png").symlink_to(outside / "secret" / "img_000.png")
    (root / "c").symlink_to(outside / "secret")  # a whole class from outside the root
    (root / "b" / "twin.png").symlink_to(root / "a" / "img_000.png")  # a second path to a file already listed
    (root / ".store").mkdir()
    (root / ".store" / "x.png").write_bytes((root / "a" / "img_001.png").read_bytes())
    (root / "b" / "z.png").symlink_to(root / ".store" / "x.png")  # inside the root, reached only by its link: read
    src = open_image_source(root)
    assert [e.key for e in src.entries] == ["a/img_000.png", "a/img_001.png", "b/img_000.png", "b/img_001.png",
                                            "b/z.png"]  # fmt: skip
    assert src.class_names == ["a", "b"] and src.labels.tolist() == [0, 0, 1, 1, 1]
    assert dict(src.rejected) == {
        "a/leak.png": "link leads outside the data root (not followed)",
        "b/twin.png": "same file as a/img_000.png (read once)",
        "c": "link leads outside the data root (not followed)",
    }
    assert src.read_bytes(4) == (root / ".store" / "x.png").read_bytes()


def test_unsafe_and_link_tar_members_are_skipped_counted_and_never_a_class(tmp_path):
    good = _png(Image.new("RGB", (8, 8), (10, 20, 30)))
    arc = tmp_path / "hostile.tar"
    with tarfile.open(arc, "w") as tf:

        def add(name, data=good, kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("train/cat/0.png")
        add("train/dog/0.png")
        add("/tmp/x.jpg")  # became a class named "/" and shifted every label
        add("../evil.png")
        add("train/cat/../../up.png")
        add("train/dog/s.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("train/dog/h.png", kind=tarfile.LNKTYPE, link="train/cat/0.png")
    src = open_image_source(arc)
    assert src.class_names == ["cat", "dog"] and [e.key for e in src.entries] == ["cat/0.png", "dog/0.png"]
    assert src.labels.tolist() == [0, 1]
    assert sorted(k for k, _ in src.rejected) == sorted(
        ["/tmp/x.jpg", "../evil.png", "train/cat/../../up.png", "train/dog/s.png", "train/dog/h.png"]
    )
    summary = SkipReport(src).summary()
    assert summary.startswith("skipped 5 file(s)") and "link member" in summary
    with pytest.raises(DigitError, match="absolute or climbs"):
        SkipReport(src, strict=True)


def _undecodable_folder(root: Path) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            (root / c / f"{i}.png").write_bytes(b"not an image %d" % i)
    return root


def test_training_on_zero_usable_images_is_refused_and_writes_nothing(tmp_path, capsys):
    import json

    from conftest import tiny_fit_argv
    from digit.cli import main

    data = _undecodable_folder(tmp_path / "bad")
    runs = {
        "vq": ["vq", "train", "--data", str(data), "--preset", "tiny", "--image-size", "16", "--steps", "1",
               "--batch-size", "4", "--out", str(tmp_path / "vq")],
        "fit": tiny_fit_argv(data, tmp_path / "fit", 2),
        "enc": ["encoder", "pretrain", "--data", str(data), "--encoder", "vit_tiny_patch16_224", "--encoder-kwargs",
                json.dumps({"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}), "--image-size", "16",
                "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--no-progress", "--out",
                str(tmp_path / "enc")],
    }  # fmt: skip
    for name, argv in runs.items():
        capsys.readouterr()
        assert main(argv) == 2, name
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("digit ")]
        assert len(err) == 1 and "no usable images" in err[0] and "skipped 8 file(s)" in err[0], (name, err)
        assert not (tmp_path / name).exists(), name


def test_vq_train_reports_skipped_files(tmp_path, capsys):
    import warnings

    from digit.cli import main

    data = write_image_folder(tmp_path / "imgs", classes=("a",), n_per_class=4)
    (data / "a" / "broken.png").write_bytes(b"not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        argv = [
            "vq",
            "train",
            "--data",
            str(data),
            "--preset",
            "tiny",
            "--image-size",
            "16",
            "--steps",
            "2",
            "--batch-size",
            "5",
            "--disc-weight",
            "0",
            "--perceptual-weight",
            "0",
            "--out",
            str(tmp_path / "run"),
        ]
        assert main(argv) == 0  # fmt: skip
    assert "skipped 1 file(s): broken.png: not an image" in capsys.readouterr().out  # one folder: unwrapped


def test_eval_image_folders_follow_the_same_link_rule(tmp_path):
    from digit.evaluation.images import open_image_set

    root = write_image_folder(tmp_path / "gen", classes=("a", "b"), n_per_class=2)
    (root / "a" / "loop").symlink_to("..")  # rglob descended into the loop
    s = open_image_set(root)
    assert len(s.dataset) == 4 and any("a/loop: link to a folder already read" in n for n in s.notes)

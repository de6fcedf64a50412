"""`--text-encoder` (and the API's ``text_encoder=``) takes a Hugging Face repository id as well as a directory: the
snapshot in the local hub cache, downloaded only with `--pretrained` / ``download_text_encoder=True``. Nothing here
reaches a network: the cache is hand-made in the test's tmp dir (the layout `huggingface_hub` writes), and every
download is a monkeypatched ``snapshot_download``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from digit.cli import main
from digit.data.text_features import (
    T5_HUB_FILES,
    RandomTextEncoder,
    load_text_encoder,
    read_caption_features,
    resolve_text_encoder,
    text_encoder_identity,
)
from digit.errors import DigitError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RANDOM_SPEC = {"kind": "random-test", "dim": 8, "max_length": 40, "seed": 5}


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """``huggingface_hub``'s cache layout: blobs/<hash>, snapshots/<commit>/<name> -> the blob, refs/main -> commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache in tmp and the calls made to ``snapshot_download`` (any download attempt fails the test)."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    real, calls = huggingface_hub.snapshot_download, []

    def spy(repo_id, **kw):
        calls.append({"repo_id": repo_id, **kw})
        assert kw["local_files_only"], "a test tried to download"
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return cache, calls


def _online(monkeypatch, fetched: dict[str, bytes] | None, tmp_path: Path) -> list[dict]:
    """Pretend the Hub is reachable: ``snapshot_download`` records its arguments and 'downloads' ``fetched``."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake(repo_id, **kw):
        calls.append({"repo_id": repo_id, **kw})
        return str(cache_repo(tmp_path / "downloaded", repo_id, fetched or {}))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_local_dir_passes_through_without_the_hub(tmp_path, hub):
    d = tmp_path / "enc"
    d.mkdir()
    assert resolve_text_encoder(d) == d and resolve_text_encoder(str(d), download=True) == d
    assert hub[1] == []  # a directory never consults the cache or the Hub


@pytest.mark.parametrize("value", ["./missing-dir", "/no/such/dir", "a/b/c", "owner/../x", "-x", "own er/x"])
def test_values_neither_dir_nor_repo_id_refused_in_one_line(value, hub):
    with pytest.raises(DigitError, match="no such directory, and not a Hugging Face repository id") as e:
        resolve_text_encoder(value, download=True)
    assert "\n" not in str(e.value) and hub[1] == []


def test_file_pathlike_and_non_string_refused(tmp_path, hub):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(DigitError, match="a file, not a text encoder directory"):
        resolve_text_encoder(f)
    with pytest.raises(DigitError, match="not a Hugging Face repository id"):  # a Path is a path, never an id
        resolve_text_encoder(Path("owner/name"))
    with pytest.raises(DigitError, match="got an empty string"):  # Path("") would be the current directory
        resolve_text_encoder("")
    with pytest.raises(DigitError, match="must be a directory or a Hugging Face repository id, got int"):
        resolve_text_encoder(3)  # type: ignore[arg-type]
    assert hub[1] == []


def test_cached_id_resolves_to_its_snapshot_without_download(hub):
    cache, calls = hub
    snap = cache_repo(cache, "owner/name", {"text_encoder.json": json.dumps(RANDOM_SPEC).encode()})
    got = resolve_text_encoder("owner/name")
    assert got == snap and (got / "text_encoder.json").is_file()
    assert len(calls) == 1 and calls[0]["repo_id"] == "owner/name" and calls[0]["local_files_only"] is True
    assert calls[0]["allow_patterns"] == T5_HUB_FILES
    assert resolve_text_encoder("owner/name", download=True) == snap  # HF_HUB_OFFLINE (conftest): the cache only
    assert [c["local_files_only"] for c in calls] == [True, True]


def test_missing_id_without_pretrained_is_one_line_and_no_download(hub):
    with pytest.raises(DigitError) as e:
        resolve_text_encoder("google/flan-t5-xl")
    msg = str(e.value)
    assert "\n" not in msg and "google/flan-t5-xl: not a directory, nor in the local Hugging Face cache" in msg
    assert (
        "`hf download google/flan-t5-xl --include '*.json' --include 'spiece.model' --include '*.safetensors'`" in msg
    )
    assert msg.endswith("or pass --pretrained (needs internet)")
    assert [c["local_files_only"] for c in hub[1]] == [True]
    with pytest.raises(DigitError, match="HF_HUB_OFFLINE is set"):  # --pretrained, but the Hub is switched off
        resolve_text_encoder("google/flan-t5-xl", download=True)
    assert [c["local_files_only"] for c in hub[1]] == [True, True]


def test_pretrained_downloads_only_t5_files(tmp_path, monkeypatch):
    calls = _online(monkeypatch, {"config.json": b"{}", "model.safetensors": b"w"}, tmp_path)
    got = resolve_text_encoder("google/flan-t5-xl", download=True)
    assert (got / "model.safetensors").read_bytes() == b"w"
    assert len(calls) == 1 and calls[0]["repo_id"] == "google/flan-t5-xl"
    assert calls[0]["local_files_only"] is False
    assert calls[0]["allow_patterns"] == ["*.json", "spiece.model", "*.safetensors"]  # no pickled *.bin, no *.pt
    # a repository with pickled weights only: the snapshot holds no weights, and that is said rather than loaded
    calls = _online(monkeypatch, {"config.json": b"{}"}, tmp_path / "2")
    with pytest.raises(DigitError, match="no .safetensors weights .*never takes pickled .bin"):
        resolve_text_encoder("owner/bin-only", download=True)


def test_hub_refusals_are_one_line(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    _online(monkeypatch, None, tmp_path)
    response = SimpleNamespace(status_code=404, headers={}, request=None)  # what the errors read of an HTTP response
    for err, want in ((RepositoryNotFoundError, "nor model repository on the Hugging Face Hub"),
                      (GatedRepoError, "is a gated repository")):  # fmt: skip

        def refuse(repo_id, err=err, **kw):
            raise err("refused", response=response)

        monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
        with pytest.raises(DigitError, match=want) as e:
            resolve_text_encoder("owner/name", download=True)
        assert "\n" not in str(e.value)


def test_identity_same_from_dir_local_dir_download_and_cache_snapshot(tmp_path, hub):
    """The sha256 recorded with caption features covers the files the encoder is loaded from: a directory, the same
    files under `hf download --local-dir` (with its .cache/ metadata), and the hub cache's snapshot (symlinks to blobs,
    beside other files of the repository) are one encoder; a changed weight file is another."""
    pytest.importorskip("transformers")
    from digit.data.small_t5 import SmallT5Config, build_small_t5

    d = tmp_path / "built"
    d.mkdir()
    build_small_t5(["a red circle", "a blue square to the left"], d, SmallT5Config(vocab_size=40, d_model=16,
                   layers=1, heads=2))  # fmt: skip
    ident = load_text_encoder(d, max_length=8).identity()
    assert ident["name"] == "built" and ident == text_encoder_identity(d, max_length=8)

    local = tmp_path / "local"
    shutil.copytree(d, local)
    (local / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (local / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text("etag\n1733072400.1\n")
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    extra = {"generation_config.json": b"{}", "pytorch_model.bin": b"pickle", "flax_model.msgpack": b"x"}
    snap = cache_repo(hub[0], "owner/tiny-t5", {**files, **extra})
    got = resolve_text_encoder("owner/tiny-t5")
    assert got == snap and (got / "model.safetensors").is_symlink()
    from_cache = load_text_encoder(got, max_length=8)
    assert from_cache.identity() == {**ident, "name": "owner/tiny-t5"}  # named by its repository id
    assert text_encoder_identity(local, max_length=8)["sha256"] == ident["sha256"]
    texts = ["a red circle", "a blue square"]
    np.testing.assert_array_equal(from_cache.encode(texts)[0], load_text_encoder(d, max_length=8).encode(texts)[0])

    other = tmp_path / "other"
    shutil.copytree(d, other)
    data = bytearray((other / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one weight bit
    (other / "model.safetensors").write_bytes(bytes(data))
    assert text_encoder_identity(other, max_length=8)["sha256"] != ident["sha256"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from conftest import TINY_IMAGE_SIZE, TINY_VIT, TINY_VIT_KWARGS

    d = tmp_path_factory.mktemp("tok")
    np.save(d / "km.npy", np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32))
    argv = ["tokenizer", "from-centroids", "--centroids", str(d / "km.npy"), "--encoder", TINY_VIT,
            "--encoder-kwargs", json.dumps(TINY_VIT_KWARGS), "--random-init", "--image-size", str(TINY_IMAGE_SIZE),
            "--layer", "1", "--out", str(d / "tokenizer")]  # fmt: skip
    assert main(argv) == 0
    return d / "tokenizer"


def test_cli_tokenize_captions_with_a_hub_id(tokenizer_dir, tmp_path, hub, capsys, monkeypatch):
    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "d", classes=("a",), n_per_class=2)
    captions = {"a/img_000.png": "a red circle", "a/img_001.png": "a blue square"}
    for name, text in captions.items():
        (root / name).with_suffix(".txt").write_text(text)
    argv = ["tokenize", "--tokenizer", str(tokenizer_dir), "--data", str(root), "--workers", "0", "--captions"]

    # not cached, no --pretrained: one line, exit 2, nothing downloaded
    assert main([*argv, "--text-encoder", "owner/enc", "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "or pass --pretrained (needs internet)" in err and "Traceback" not in err
    assert main([*argv, "--text-encoder", "no/such/dir", "--out", str(tmp_path / "o2")]) == 2
    assert "not a Hugging Face repository id" in capsys.readouterr().err
    assert main([*argv[:-1], "--pretrained", "--out", str(tmp_path / "o3")]) == 2
    assert "--pretrained needs --text-encoder REPO_ID" in capsys.readouterr().err

    # cached: the features are the cached encoder's, recorded with its identity
    cache_repo(hub[0], "owner/enc", {"text_encoder.json": json.dumps(RANDOM_SPEC).encode()})
    out = tmp_path / "tok"
    assert main([*argv, "--text-encoder", "owner/enc", "--out", str(out)]) == 0, capsys.readouterr().err
    want = RandomTextEncoder(8, 40, 5)
    cf = read_caption_features(out, expect_encoder=want.identity())
    assert cf.texts == list(captions.values())
    np.testing.assert_array_equal(cf.features, want.encode(cf.texts)[0].astype(np.float16))
    assert all(c["local_files_only"] for c in hub[1])

    # --pretrained: the download is asked for, with the T5 file patterns
    calls = _online(monkeypatch, {"text_encoder.json": json.dumps(RANDOM_SPEC).encode()}, tmp_path / "dl")
    assert main([*argv, "--text-encoder", "owner/new", "--pretrained", "--out", str(tmp_path / "tok2")]) == 0
    assert [(c["repo_id"], c["local_files_only"], c["allow_patterns"]) for c in calls] == [
        ("owner/new", False, T5_HUB_FILES)
    ]


@pytest.mark.parametrize("command", ["tokenize", "train", "sample", "generate", "serve"])
def test_every_text_command_takes_the_same_flags(command):
    from digit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    flags = {s: a for a in sub._actions for s in a.option_strings}
    assert flags["--text-encoder"].metavar == "DIR|REPO_ID" and flags["--text-encoder"].type is None
    assert flags["--pretrained"].default is False and "download" in flags["--pretrained"].help


def test_serve_resolves_the_hub_id_before_starting(tmp_path, hub, monkeypatch):
    import digit.serve.server as server

    seen = {}
    monkeypatch.setattr(server, "run_server", lambda model, **kw: seen.update(kw) or 0)
    snap = cache_repo(hub[0], "owner/enc", {"text_encoder.json": json.dumps(RANDOM_SPEC).encode()})
    assert main(["serve", "--model", str(tmp_path), "--text-encoder", "owner/enc"]) == 0
    assert seen["text_encoder"] == snap
    assert main(["serve", "--model", str(tmp_path), "--pretrained"]) == 2  # --pretrained alone: nothing to download

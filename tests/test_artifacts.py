"""Corrupt or mismatched artifacts: every command that reads a file answers `digit CMD: error: <path>: ...` (exit 2).

The artifacts (tokenizer, encoder directory, VQ, token directories, GPT runs with their training state) are built once
per module with tiny random-weight models; each case copies one artifact directory, damages one file one way, and runs
the commands that read it in-process.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_IMAGE_SIZE, TINY_VIT, TINY_VIT_KWARGS, write_image_folder
from digit.cli import main
from digit.data.tokens import write_token_dir
from digit.tokenizers.discriminative import DiscriminativeTokenizer
from digit.tokenizers.encoder import build_encoder, save_encoder_dir
from digit.tokenizers.vq import VQModel
from digit.utils.artifacts import DIGEST_KEY, tensors_sha256
from digit.utils.io import atomic_save_safetensors

N, K = 8, 16
SOURCE = {"path": "/data/images", "n_files": N, "n_skipped": 0, "skipped": []}
TRAIN = ["--model", "tiny", "--batch-size", "4", "--no-progress", "--log-every", "1000"]


def s1_train_argv(tokens: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--tokens", str(tokens), "--steps", str(steps), *TRAIN, *extra, "--out", str(out)]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    write_image_folder(root / "images", n_per_class=2, size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))
    encoder = build_encoder(TINY_VIT, TINY_VIT_KWARGS, random_init=True, image_size=TINY_IMAGE_SIZE, layer=1)
    tok = DiscriminativeTokenizer(encoder, rng.normal(size=(K, encoder.embed_dim)).astype(np.float32))
    tok.save(root / "tok")
    save_encoder_dir(encoder, root / "enc", name=TINY_VIT, kwargs=TINY_VIT_KWARGS, image_size=TINY_IMAGE_SIZE)
    np.save(root / "centroids.npy", rng.normal(size=(K, encoder.embed_dim)).astype(np.float32))
    vq = VQModel.from_preset("tiny", image_size=16, codebook_size=32)
    vq.save(root / "vq")
    labels = np.arange(N) % 2
    common = dict(class_names=["a", "b"], num_classes=2)
    vq_meta = {"source": SOURCE, "tokenizer": vq.config()}
    write_token_dir(root / "vqtok", rng.integers(0, 32, (N, 4, 4)), labels, vocab_size=32, extra_meta=vq_meta, **common)
    disc_meta = {"source": SOURCE, "tokenizer": tok.config()}
    write_token_dir(root / "disc", rng.integers(0, K, (N, 4, 4)), labels, vocab_size=K, extra_meta=disc_meta, **common)
    assert main(s1_train_argv(root / "vqtok", root / "s1", 2)) == 0
    assert main(s1_train_argv(root / "vqtok", root / "dec", 2, "--prefix-tokens", str(root / "disc"))) == 0
    return root


# ----------------------------------------------------------------------------------------------- corruptions


def _rewrite_json(path: Path, edit: Callable[[dict], None]) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _set(obj: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        obj = obj[p]
    obj[last] = value


def _drop(obj: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        obj = obj[p]
    del obj[last]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def flip_at(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def flip(path: Path) -> None:
    """Flip one byte where it silently changes a value today: inside tensor data (safetensors, torch zip records,
    npy payloads), and in the middle of a JSON text."""
    size = path.stat().st_size
    if path.suffix == ".pt":
        with zipfile.ZipFile(path) as z:
            info = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor record
        raw = path.read_bytes()
        h = info.header_offset
        start = h + 30 + int.from_bytes(raw[h + 26 : h + 28], "little") + int.from_bytes(raw[h + 28 : h + 30], "little")
        flip_at(path, start + info.file_size // 2)
    elif path.suffix == ".npy":
        flip_at(path, size - 1)  # the top byte of the last (little-endian) element
    else:
        flip_at(path, size - 3 if path.suffix == ".safetensors" else size // 2)


def invalid_json(path: Path) -> None:
    path.write_text('{"type": "vq", "grid": [4, 4')


def object_dtype(path: Path) -> None:
    np.save(path, np.array([[["x"]]], dtype=object), allow_pickle=True)


def float_dtype(path: Path) -> None:
    np.save(path, np.load(path).astype(np.float32))


def nan_values(path: Path) -> None:
    a = np.load(path)
    a[0, 0] = np.nan
    np.save(path, a)


def json_edit(how: str, key: str, value=None) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        _rewrite_json(path, (lambda o: _drop(o, key)) if how == "drop" else (lambda o: _set(o, key, value)))

    edit.__name__ = f"{how}_{key}"
    return edit


def npy_reshape(shape_of: Callable[[tuple], tuple]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        a = np.load(path)
        np.save(path, np.resize(a, shape_of(a.shape)))

    edit.__name__ = "wrong_shape"
    return edit


def safetensors_wrong_shape(path: Path) -> None:
    """A well-formed file (its digest valid) whose largest tensor has one row too many."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    name = max(state, key=lambda k: state[k].numel())
    state[name] = torch.cat([state[name], state[name][:1]])
    atomic_save_safetensors(path, state)


def state_edit(how: str, key: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        if how == "drop":
            del state[key]
        else:
            state[key] = "seven"
        torch.save(state, path)

    edit.__name__ = f"{how}_{key}"
    return edit


# ----------------------------------------------------------------------------------------------- commands
# Each takes (built artifacts, the damaged copy of the artifact's directory, a scratch directory) -> argv.


def sample(b, d, t):
    return ["sample", "--run", str(d), "-n", "2", "--out", str(t / "o")]


def sample_prefix(b, d, t):
    return ["sample", "--run", str(b / "dec"), "--prefix-tokens", str(d), "-n", "2", "--out", str(t / "o")]


def probe(b, d, t):
    return ["probe", "--run", str(d), "--tokens", str(b / "vqtok"), "--val-tokens", str(b / "vqtok"), "--epochs", "1"]


def probe_tokens(b, d, t):
    return ["probe", "--run", str(b / "s1"), "--tokens", str(d), "--val-tokens", str(b / "vqtok"), "--epochs", "1"]


def generate(b, d, t):
    return ["generate", "--stage1", str(d), "--vq", str(b / "vq"), "-n", "1", "--out", str(t / "o")]


def generate_vq(b, d, t):
    return ["generate", "--stage1", str(b / "s1"), "--vq", str(d), "-n", "1", "--out", str(t / "o")]


def resume(b, d, t):
    return s1_train_argv(b / "vqtok", d, 3, "--resume")


def train_tokens(b, d, t):
    return s1_train_argv(d, t / "run", 1)


def tokenize(b, d, t):
    return ["tokenize", "--tokenizer", str(d), "--data", str(b / "images"), "--workers", "0", "--out", str(t / "o")]


def reconstruct(b, d, t):
    return ["vq", "reconstruct", "--vq", str(d), "--data", str(b / "images"), "--out", str(t / "o")]


def from_centroids(b, d, t):
    return ["tokenizer", "from-centroids", "--encoder", str(d), "--centroids", str(b / "centroids.npy")] + [
        "--layer", "1", "--out", str(t / "o"),
    ]  # fmt: skip


COMMON = [truncate, empty, flip]
JSON_WAYS = [*COMMON, invalid_json]
# (artifact directory, file, ways to damage it, commands that read it)
ARTIFACTS = [
    ("s1", "config.json", [*JSON_WAYS, json_edit("drop", "model"), json_edit("set", "model.dim", "wide"),
                           json_edit("set", "model.grid", [4]), json_edit("drop", "model.vocab_size")],
     [sample, probe, generate]),
    ("s1", "config.json", [invalid_json, json_edit("set", "train", [])], [resume]),
    ("s1", "model.safetensors", [*COMMON, safetensors_wrong_shape], [sample, probe, generate]),
    ("s1", "train_state.pt", [*COMMON, state_edit("drop", "optimizers"), state_edit("set", "step")], [resume]),
    ("vqtok", "meta.json", [*JSON_WAYS, json_edit("drop", "grid"), json_edit("set", "vocab_size", "32"),
                            json_edit("set", "grid", [4, 4, 1]), json_edit("set", "n_rows", 7)],
     [train_tokens, probe_tokens]),
    ("vqtok", "tokens.npy", [*COMMON, object_dtype, float_dtype, npy_reshape(lambda s: s[:2])],
     [train_tokens, probe_tokens]),
    ("vqtok", "labels.npy", [*COMMON, float_dtype, npy_reshape(lambda s: (s[0] - 1,))], [train_tokens, probe_tokens]),
    ("disc", "tokens.npy", [*COMMON, object_dtype, float_dtype, npy_reshape(lambda s: (s[0], 2, 8))], [sample_prefix]),
    ("disc", "meta.json", [*JSON_WAYS, json_edit("drop", "vocab_size")], [sample_prefix]),
    ("tok", "tokenizer.json", [*JSON_WAYS, json_edit("drop", "encoder.weights"), json_edit("set", "encoder.layer", "1"),
                               json_edit("set", "vocab_size", K + 1), json_edit("set", "codebook_fingerprint", "0" * 16)],
     [tokenize]),
    ("tok", "centroids.npy", [*COMMON, object_dtype, nan_values, npy_reshape(lambda s: (s[0] - 1, s[1])),
                              npy_reshape(lambda s: (s[0], s[1] + 1))], [tokenize]),
    ("tok", "encoder.safetensors", [*COMMON, safetensors_wrong_shape], [tokenize]),
    ("vq", "tokenizer.json", [*JSON_WAYS, json_edit("drop", "model"), json_edit("set", "model.ch", "128"),
                              json_edit("set", "vocab_size", 64)], [generate_vq, reconstruct, tokenize]),
    # (`digit generate` refuses this one earlier, as a VQ codebook other than stage 1's, before loading weights)
    ("vq", "tokenizer.json", [json_edit("set", "codebook_fingerprint", "0" * 16)], [reconstruct, tokenize]),
    ("vq", "model.safetensors", [*COMMON, safetensors_wrong_shape], [generate_vq, reconstruct, tokenize]),
    ("enc", "encoder.json", [*JSON_WAYS, json_edit("drop", "name"), json_edit("set", "image_size", "56")],
     [from_centroids]),
    ("enc", "encoder.safetensors", [*COMMON, safetensors_wrong_shape], [from_centroids]),
]  # fmt: skip

CASES = [
    pytest.param(art, fname, way, cmd, id=f"{art}/{fname}-{way.__name__}-{cmd.__name__}")
    for art, fname, ways, cmds in ARTIFACTS
    for way in ways
    for cmd in cmds
]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def damaged_copy(built: Path, art: str, tmp_path: Path) -> Path:
    d = tmp_path / art
    shutil.copytree(built / art, d)
    return d


@pytest.mark.parametrize("art, fname, way, cmd", CASES)
def test_damaged_artifact_is_one_line_error_naming_the_file(built, tmp_path, capsys, art, fname, way, cmd):
    d = damaged_copy(built, art, tmp_path)
    way(d / fname)
    rc, err = run_cli(cmd(built, d, tmp_path), capsys)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert lines[-1].startswith("digit ") and ": error: " in lines[-1], err
    assert str(d / fname) in lines[-1], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "art, cmd", [("s1", sample), ("s1", probe), ("tok", tokenize), ("vq", reconstruct), ("enc", from_centroids)]
)
def test_undamaged_copies_still_work(built, tmp_path, capsys, art, cmd):
    """The control for the cases above: the same commands on intact copies succeed."""
    d = damaged_copy(built, art, tmp_path)
    rc, err = run_cli(cmd(built, d, tmp_path), capsys)
    assert rc == 0, err


def test_resume_of_intact_copy_still_works(built, tmp_path, capsys):
    d = damaged_copy(built, "s1", tmp_path)
    rc, err = run_cli(resume(built, d, tmp_path), capsys)
    assert rc == 0, err
    assert json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


# ----------------------------------------------------------------------------------------------- integrity


def test_written_safetensors_record_the_digest_of_their_tensors(built):
    from safetensors import safe_open

    for f in (
        built / "s1" / "model.safetensors",
        built / "vq" / "model.safetensors",
        built / "tok/encoder.safetensors",
    ):
        with safe_open(str(f), "pt") as s:
            meta = s.metadata()
            state = {k: s.get_tensor(k) for k in s.keys()}  # noqa: SIM118
        assert meta[DIGEST_KEY] == tensors_sha256(state)


def test_digest_is_a_sha256_over_names_dtypes_shapes_and_bytes():
    import hashlib

    a = torch.arange(6, dtype=torch.float32).view(2, 3)
    b = torch.tensor([1, 2], dtype=torch.bfloat16)
    h = hashlib.sha256()
    for name, t in (("a", a), ("b", b)):  # name order
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert tensors_sha256({"b": b, "a": a}) == h.hexdigest()
    assert tensors_sha256({"a": a, "b": b.clone()}) == h.hexdigest()
    assert tensors_sha256({"a": a.view(3, 2), "b": b}) != h.hexdigest()  # same bytes, another shape
    assert tensors_sha256({"a": a, "c": b}) != h.hexdigest()


def test_flipped_weight_byte_is_refused_unless_checks_are_off(built, tmp_path, capsys, monkeypatch):
    d = damaged_copy(built, "s1", tmp_path)
    flip(d / "model.safetensors")
    rc, err = run_cli(sample(built, d, tmp_path), capsys)
    assert rc == 2 and "sha256" in err
    rc, err = run_cli(["--no-verify-weights", *sample(built, d, tmp_path / "a")], capsys)
    assert rc == 0, err
    monkeypatch.setenv("DIGIT_VERIFY_WEIGHTS", "0")
    rc, err = run_cli(sample(built, d, tmp_path / "b"), capsys)
    assert rc == 0, err


def test_files_without_a_digest_still_load(built, tmp_path, capsys):
    """Older directories (written before digests) load as before."""
    from safetensors.torch import load_file, save_file

    d = damaged_copy(built, "s1", tmp_path)
    save_file(load_file(str(d / "model.safetensors")), str(d / "model.safetensors"))
    rc, err = run_cli(sample(built, d, tmp_path), capsys)
    assert rc == 0, err


def test_shipped_folder_is_verified_through_its_manifest(built, tmp_path, capsys):
    """A folder laid out like `digit recipe ship` output: files are checked against models.json's sha256."""
    from safetensors.torch import load_file, save_file

    from digit.utils.io import file_sha256

    folder = tmp_path / "shipped"
    shutil.copytree(built / "s1", folder / "stage1")
    weights = folder / "stage1" / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # shipped files predate digests
    (folder / "models.json").write_text(json.dumps({"sha256": {"stage1/model.safetensors": file_sha256(weights)}}))
    rc, err = run_cli(sample(built, folder / "stage1", tmp_path / "a"), capsys)
    assert rc == 0, err
    flip(weights)
    rc, err = run_cli(sample(built, folder / "stage1", tmp_path / "b"), capsys)
    assert rc == 2 and str(weights) in err and "models.json" in err


def test_shipped_assets_match_their_manifest():
    """The reference models in the package load with their manifest check on (a corrupt asset would be refused)."""
    from digit.demo import shipped_models
    from digit.utils.artifacts import _shipped_digest
    from digit.utils.io import file_sha256

    folder = shipped_models()
    if not (folder / "models.json").is_file():
        pytest.skip("no shipped models in this checkout")
    for part in ("stage1/model.safetensors", "stage2/model.safetensors", "vq/model.safetensors"):
        want = _shipped_digest(folder / part)
        assert want is not None and want == file_sha256(folder / part)


def test_flipped_byte_in_training_state_is_refused(built, tmp_path, capsys):
    d = damaged_copy(built, "s1", tmp_path)
    flip(d / "train_state.pt")
    rc, err = run_cli(resume(built, d, tmp_path), capsys)
    assert rc == 2 and "sha256" in err and str(d / "train_state.pt") in err


# ----------------------------------------------------------------------------------------------- provenance


def _retokenized(built: Path, name: str, out: Path) -> Path:
    """The same ids, grid and K, but recorded as made by another codebook."""
    from digit.data.tokens import read_token_dir

    src = read_token_dir(built / name)
    meta = {k: v for k, v in src.meta.items() if k not in ("format", "format_version", "grid", "n_images", "n_rows")}
    meta["tokenizer"] = {**meta["tokenizer"], "codebook_fingerprint": "feedfacefeedface"}
    meta.pop("vocab_size")
    return write_token_dir(out, np.asarray(src.tokens), src.labels, vocab_size=src.vocab_size, extra_meta=meta)


def test_sample_refuses_prefix_tokens_of_another_tokenizer(built, tmp_path, capsys):
    other = _retokenized(built, "disc", tmp_path / "other")
    rc, err = run_cli(sample_prefix(built, other, tmp_path), capsys)
    assert rc == 2 and "another tokenizer" in err and str(other) in err
    rc, err = run_cli(sample_prefix(built, built / "disc", tmp_path), capsys)
    assert rc == 0, err


def test_probe_refuses_tokens_of_another_tokenizer(built, tmp_path, capsys):
    other = _retokenized(built, "vqtok", tmp_path / "other")
    rc, err = run_cli(probe_tokens(built, other, tmp_path), capsys)
    assert rc == 2 and "another tokenizer" in err and str(other) in err
    argv = ["probe", "--run", str(built / "s1"), "--tokens", str(built / "vqtok"), "--val-tokens", str(other)]
    rc, err = run_cli([*argv, "--epochs", "1"], capsys)
    assert rc == 2 and str(other) in err


@pytest.mark.parametrize("damage", ["features", "key"])
def test_damaged_probe_feature_cache_is_a_miss(tmp_path, damage):
    """A cache is not an artifact to refuse: a truncated features file or key file is extracted again."""
    from digit.evaluation.probe import cached_gpt_features, extract_gpt_features, feature_cache_key
    from digit.models import build_config
    from digit.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(build_config("tiny", vocab_size=32, grid=(4, 4), n_layers=2, dim=32, n_heads=4)).eval()
    tokens, layers = np.random.default_rng(0).integers(0, 32, size=(6, 4, 4)), [0, 2]
    key = feature_cache_key("0" * 64, tokens, layers)
    cached_gpt_features(model, tokens, layers, cache_dir=tmp_path, name="train", key=key, batch_size=4)
    truncate(tmp_path / ("train_features.npy" if damage == "features" else "train_features.json"))
    got = cached_gpt_features(model, tokens, layers, cache_dir=tmp_path, name="train", key=key, batch_size=4)
    np.testing.assert_array_equal(np.asarray(got), extract_gpt_features(model, tokens, layers, batch_size=4))
    assert json.loads((tmp_path / "train_features.json").read_text()) == key

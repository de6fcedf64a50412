"""The Python API through its public names: `from digit import Pipeline`, from_pretrained (folders, the shipped
CIFAR-10 models, hub ids with a monkeypatched huggingface_hub, offline), __call__, save_pretrained, push_to_hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch

from digit import DigitError, Pipeline, PipelineOutput, SamplingParams
from digit.cli import main

CLASSES = ["ant", "bee", "cat", "dog"]
DISC_TOKENIZER = {"type": "discriminative", "vocab_size": 16, "grid": [2, 2], "encoder": {"name": "test"}, "layer": 3}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _write_run(out: Path, cfg, meta: dict, prefix_meta: dict | None = None, seed: int = 0) -> None:
    """A random-weight GPT run directory as `digit train` writes one (config.json + model.safetensors)."""
    from digit.models import GPT
    from digit.utils.io import atomic_save_safetensors, atomic_write_json

    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # the init zeroes the output head (uniform logits): give every weight some signal
        for w in model.parameters():
            w.add_(0.05 * torch.randn_like(w))
    out.mkdir(parents=True)
    atomic_save_safetensors(out / "model.safetensors", model.state_dict())
    train = {"steps": 2, "batch_size": 4, "lr": 0.003, "schedule": "cosine", "seed": seed}
    data = {"tokens": "/data/tokens", "meta": meta, "prefix_meta": prefix_meta}
    atomic_write_json(out / "config.json", {"task": "gpt", "model": cfg.to_dict(), "train": train, "data": data})


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight model folders: DiGIT (stage1/ stage2/ vq/ + models.json as `digit recipe ship` writes) and
    LlamaGen (stage1/ vq/)."""
    from digit.models import build_config
    from digit.tokenizers.vq import VQModel

    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    vq = VQModel.from_preset("tiny", image_size=16, codebook_size=32)  # 16 px <-> 4x4 codes
    common = {"num_classes": 4, "class_names": CLASSES, "n_images": 4}
    disc_meta = {**common, "grid": [2, 2], "vocab_size": 16, "tokenizer": DISC_TOKENIZER}
    vq_meta = {**common, "grid": [4, 4], "vocab_size": 32, "tokenizer": vq.config()}
    s1 = build_config("tiny", vocab_size=16, grid=(2, 2), cond="class", num_classes=4)
    dec = build_config("tiny", vocab_size=32, grid=(4, 4), cond="prefix", prefix_vocab_size=16, prefix_grid=(2, 2))
    s1_vq = build_config("tiny", vocab_size=32, grid=(4, 4), cond="class", num_classes=4)
    digit_dir, llamagen_dir = root / "digit", root / "llamagen"
    for folder in (digit_dir, llamagen_dir):
        vq.save(folder / "vq")
    _write_run(digit_dir / "stage1", s1, disc_meta)
    _write_run(digit_dir / "stage2", dec, vq_meta, prefix_meta=disc_meta, seed=1)
    (digit_dir / "models.json").write_text(json.dumps({"made_by": "a test", "figures": {"fd": {"digit": 1.5}}}))
    _write_run(llamagen_dir / "stage1", s1_vq, vq_meta, seed=2)
    return {"root": root, "digit": digit_dir, "llamagen": llamagen_dir}


@pytest.fixture(scope="module")
def pipe(folders) -> Pipeline:
    return Pipeline.from_pretrained(folders["digit"])


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_import_digit_stays_light_and_exports_the_api() -> None:
    code = (
        "import sys, digit; assert 'torch' not in sys.modules; from digit import Pipeline; print(Pipeline.__module__)"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "digit.pipeline"


def test_images_are_rgb_pil_of_the_vq_size_and_seeded(pipe) -> None:
    assert pipe.kind == "digit-ar" and pipe.class_names == CLASSES and pipe.image_size == 16
    images = pipe(classes=["ant", "bee"], num_images=4, seed=3)
    assert isinstance(images, list) and len(images) == 4
    assert all(im.mode == "RGB" and im.size == (16, 16) for im in images)
    again = pipe(classes=["ant", "bee"], num_images=4, seed=3, batch_size=1)  # per-image generators: batch-free
    assert np.array_equal(_pixels(images), _pixels(again))
    other = pipe(classes=["ant", "bee"], num_images=4, seed=4)
    assert not np.array_equal(_pixels(images), _pixels(other))
    px = _pixels(images)
    assert px.dtype == np.uint8 and px.std() > 0  # not a blank canvas


def test_tokens_and_labels_come_with_return_tokens(pipe) -> None:
    out = pipe(classes=["dog", 1, "2"], num_images=5, seed=0, return_tokens=True)
    assert isinstance(out, PipelineOutput)
    assert out.labels.tolist() == [3, 1, 2, 3, 1]  # names, indices and index strings, cycled
    assert out.tokens.shape == (5, 2, 2) and out.tokens.min() >= 0 and out.tokens.max() < 16
    assert np.array_equal(_pixels(out.images), _pixels(pipe(classes=["dog", 1, "2"], num_images=5, seed=0)))
    assert out.parameters["seed"] == 0 and out.parameters["decoder"]["top_p"] == 0.8  # the AR decoder's default
    balanced = pipe(num_images=6, seed=0, return_tokens=True)
    assert balanced.labels.tolist() == [0, 1, 2, 3, 0, 1]
    assert pipe("cat", seed=0, return_tokens=True).labels.tolist() == [2]


def test_sampling_parameters_as_keywords_object_or_dict(pipe) -> None:
    kw = pipe(classes=[0, 1], seed=1, top_k=3, cfg_scale=1.5, temperature=0.7)
    obj = pipe(classes=[0, 1], seed=1, sampling=SamplingParams(top_k=3, cfg_scale=1.5, temperature=0.7))
    dct = pipe(classes=[0, 1], seed=1, sampling={"top_k": 3, "cfg_scale": 1.5}, temperature=0.7)
    assert np.array_equal(_pixels(kw), _pixels(obj)) and np.array_equal(_pixels(kw), _pixels(dct))
    greedy = {"top_k": 1}  # one candidate per token: the seed no longer matters, in either stage
    a = pipe(classes=[0, 1], seed=1, decoder_sampling=greedy, **greedy)
    assert np.array_equal(_pixels(a), _pixels(pipe(classes=[0, 1], seed=2, decoder_sampling=greedy, **greedy)))


def test_same_pixels_as_digit_generate(pipe, folders, tmp_path) -> None:
    d = folders["digit"]
    argv = ["generate", "--stage1", str(d / "stage1"), "--decoder", str(d / "stage2"), "--vq", str(d / "vq"),
            "--classes", "bee", "3", "-n", "4", "--seed", "5", "--top-k", "5", "--cfg-scale", "2",
            "--decoder-top-p", "0.9", "--out", str(tmp_path / "gen")]  # fmt: skip
    assert main(argv) == 0
    npz = np.load(tmp_path / "gen" / "samples.npz")
    out = pipe(classes=["bee", 3], num_images=4, seed=5, top_k=5, cfg_scale=2.0, decoder_sampling={"top_p": 0.9})
    assert npz["labels"].tolist() == [1, 3, 1, 3]
    assert np.array_equal(npz["images"], _pixels(out))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (dict(classes=["zebra"]), "unknown class 'zebra'"),
        (dict(classes=[7]), r"class 7 outside \[0, 4\)"),
        (dict(classes=[True]), "unknown class True"),
        (dict(classes=[]), "classes is empty"),
        (dict(num_images=0), "num_images must be a positive integer"),
        (dict(), "give num_images N or classes"),
        (dict(classes=[0], temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
        (dict(classes=[0], top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(classes=[0], temprature=1.0), "unknown sampling parameters: temprature"),
        (dict(classes=[0], sampling=3), "sampling must be a SamplingParams or a dict"),
        (dict(classes=[0], decoder_sampling={"top_k": -1}), "top_k must be an integer >= 0"),
        (dict(classes=[0], seed=1.5), "seed must be an integer"),
        (dict(classes=[0], batch_size=0), "batch_size must be a positive integer"),
        (dict(classes=[0], decoder_official=True), "needs an AR decoder converted from DiGIT"),
    ],
)
def test_bad_input_is_refused_with_a_digit_error(pipe, call, message) -> None:
    with pytest.raises(DigitError, match=message):
        pipe(**call)


def test_from_runs_takes_the_pieces_as_separate_directories(pipe, folders) -> None:
    d = folders["digit"]
    runs = Pipeline.from_runs(d / "stage1", d / "vq", d / "stage2")
    assert runs.kind == "digit-ar" and runs.class_names == CLASSES
    assert np.array_equal(_pixels(runs(classes=[0, 3], seed=9)), _pixels(pipe(classes=[0, 3], seed=9)))
    with pytest.raises(DigitError, match="pass a --decoder"):  # the pairing checks of `digit generate`
        Pipeline.from_runs(d / "stage1", d / "vq")


def test_a_converted_decoders_special_rows_travel_and_official_sampling_runs(folders, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from digit.models import build_config

    folder = tmp_path / "converted"
    shutil.copytree(folders["digit"], folder, ignore=shutil.ignore_patterns("stage2"))
    dec = build_config("tiny", arch="fairseq", vocab_size=32, grid=(4, 4), cond="prefix", prefix_vocab_size=16, prefix_grid=(2, 2))  # fmt: skip
    stage2_meta = json.loads((folders["digit"] / "stage2" / "config.json").read_text())["data"]
    _write_run(folder / "stage2", dec, stage2_meta["meta"], prefix_meta=stage2_meta["prefix_meta"], seed=3)
    rows = torch.randn(5, 64)  # fairseq's special-symbol output rows, as `digit convert digit` keeps them
    save_file({"output_special.weight": rows}, str(folder / "stage2" / "official_head.safetensors"))
    pipe = Pipeline.from_pretrained(folder)
    official = pipe(classes=[0, 1, 2], seed=4, decoder_official=True, decoder_sampling={"top_k": 5}, return_tokens=True)
    assert official.parameters["decoder_official"] is True and len(official.images) == 3
    saved = pipe.save_pretrained(tmp_path / "saved")
    assert torch.equal(load_file(str(saved / "stage2" / "official_head.safetensors"))["output_special.weight"], rows)
    back = Pipeline.from_pretrained(saved)(
        classes=[0, 1, 2], seed=4, decoder_official=True, decoder_sampling={"top_k": 5}
    )
    assert np.array_equal(_pixels(official.images), _pixels(back))
    with pytest.raises(DigitError, match="standard filters"):
        pipe(classes=[0], decoder_official=True, decoder_sampling={"decode": "jacobi"})


def test_llamagen_folder_has_no_decoder(folders) -> None:
    lg = Pipeline.from_pretrained(folders["llamagen"])
    assert lg.kind == "llamagen" and lg.decoder is None
    out = lg(classes=["cat"], num_images=2, seed=0, return_tokens=True)
    assert [im.size for im in out.images] == [(16, 16)] * 2 and out.tokens.shape == (2, 4, 4)
    with pytest.raises(DigitError, match="no stage-2 decoder"):
        lg(classes=[0], decoder_sampling={"top_p": 0.5})


def test_save_pretrained_round_trip_and_model_card(pipe, tmp_path) -> None:
    out = pipe.save_pretrained(tmp_path / "saved")
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"pipeline.json", "README.md", "stage1/config.json", "stage1/model.safetensors", "stage2/config.json",
            "stage2/model.safetensors", "vq/tokenizer.json", "vq/model.safetensors"} <= files  # fmt: skip
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["kind"] == "digit-ar" and meta["class_names"] == CLASSES and meta["license"] == "apache-2.0"
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "digit"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "class-conditional-image-generation" in card.data.tags
    assert "steps 2, batch_size 4, lr 0.003" in card.text  # how it was trained, from the runs' config.json
    assert "| 1.5 |" in card.text and "FID-proxy" in card.text  # the figure models.json recorded
    assert "from digit import Pipeline" in card.text
    back = Pipeline.from_pretrained(out)
    assert back.kind == pipe.kind and back.class_names == CLASSES and back.info["figures"] == {"fd": {"digit": 1.5}}
    a = pipe(classes=[0, 1, 2], num_images=6, seed=11, top_k=4, return_tokens=True)
    b = back(classes=[0, 1, 2], num_images=6, seed=11, top_k=4, return_tokens=True)
    assert np.array_equal(_pixels(a.images), _pixels(b.images)) and np.array_equal(a.tokens, b.tokens)
    again = back.save_pretrained(tmp_path / "saved2", license="mit")  # a reloaded folder saves again
    assert huggingface_hub.ModelCard.load(again / "README.md").data.license == "mit"


def test_save_pretrained_refuses_foreign_folders_and_is_atomic(pipe, folders, tmp_path, monkeypatch) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DigitError, match="not empty and was not written by save_pretrained"):
        pipe.save_pretrained(foreign)
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    with pytest.raises(DigitError, match="is inside the input"):
        pipe.save_pretrained(folders["digit"] / "copy")  # never into the folder it was loaded from
    ours = pipe.save_pretrained(tmp_path / "ours")
    pipe.save_pretrained(ours)  # its own earlier output is replaced without overwrite=
    pipe.save_pretrained(foreign, overwrite=True)
    assert not (foreign / "notes.txt").exists() and (foreign / "pipeline.json").is_file()

    import digit.model_card

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(digit.model_card, "model_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pipe.save_pretrained(tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no staging directory left


def test_shipped_cifar10_models_load_sample_and_round_trip(tmp_path) -> None:
    pipe = Pipeline.from_pretrained("cifar10")
    assert pipe.kind == "digit-ar" and pipe.num_classes == 10 and pipe.image_size == 32
    assert pipe.class_names[3] == "cat" and pipe.info["recipe_size"] == "cpu"
    images = pipe(classes=["cat", "ship"], seed=0, cfg_scale=2.0, top_k=100)
    assert [(im.mode, im.size) for im in images] == [("RGB", (32, 32))] * 2
    saved = pipe.save_pretrained(tmp_path / "cifar10")
    assert (saved / "tokenizer" / "encoder.safetensors").is_file()  # the discriminative tokenizer travels
    card = (saved / "README.md").read_text()
    assert "Inception FID of DiGIT samples" in card and "tokenizer: weighted kNN top-1" in card
    back = Pipeline.from_pretrained(saved)
    assert np.array_equal(_pixels(images), _pixels(back(classes=["cat", "ship"], seed=0, cfg_scale=2.0, top_k=100)))


def test_offline_hub_id_is_a_one_line_error_naming_the_download(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DigitError) as e:
        Pipeline.from_pretrained("someone/digit-cifar10", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "offline (HF_HUB_OFFLINE is set)" in msg
    assert "hf download someone/digit-cifar10 --local-dir someone--digit-cifar10" in msg
    with pytest.raises(DigitError, match="local_files_only=True"):
        Pipeline.from_pretrained("someone/digit-cifar10", cache_dir=tmp_path / "cache", local_files_only=True)
    with pytest.raises(DigitError, match="no such model folder"):
        Pipeline.from_pretrained("./not/here")


def test_offline_hub_id_loads_from_the_cache(pipe, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--digit-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    pipe.save_pretrained(repo / "snapshots" / commit)
    back = Pipeline.from_pretrained("someone/digit-tiny", cache_dir=tmp_path / "cache")
    assert np.array_equal(_pixels(pipe(classes=[1], seed=2)), _pixels(back(classes=[1], seed=2)))


def test_online_hub_id_goes_through_snapshot_download(pipe, monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    folder = pipe.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        if repo_id == "someone/unreachable":
            raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    back = Pipeline.from_pretrained("someone/digit-tiny", revision="v1")
    assert back.kind == "digit-ar" and calls[0][0] == "someone/digit-tiny"
    kw = calls[0][1]
    assert kw["revision"] == "v1" and kw["local_files_only"] is False and "*.safetensors" in kw["allow_patterns"]
    assert not any(p.endswith((".pt", ".bin", ".pkl")) for p in kw["allow_patterns"])  # no pickles
    with pytest.raises(DigitError, match="Hub could not be reached: download it where there is network"):
        Pipeline.from_pretrained("someone/unreachable")


def test_push_to_hub_creates_the_repo_and_uploads_a_saved_folder(pipe, monkeypatch) -> None:
    seen: dict = {}

    class FakeApi:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, **kw):
            seen["create"] = (repo_id, kw)

        def upload_folder(self, *, repo_id, folder_path, **kw):
            seen["upload"] = (repo_id, kw)
            folder = Path(folder_path)
            seen["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            seen["card"] = (folder / "README.md").read_text()
            loaded = Pipeline.from_pretrained(folder)  # what lands on the hub loads back
            seen["same"] = np.array_equal(_pixels(loaded(classes=[2], seed=0)), _pixels(pipe(classes=[2], seed=0)))
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert pipe.push_to_hub("someone/digit-tiny", private=True, token="tok") == "commit-info"
    assert seen["token"] == "tok"
    assert seen["create"] == ("someone/digit-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, kw = seen["upload"]
    assert repo_id == "someone/digit-tiny" and kw["ignore_patterns"] == [".digit-output.json"]
    assert "pipeline.json" in seen["files"] and "stage2/model.safetensors" in seen["files"]
    assert 'Pipeline.from_pretrained("someone/digit-tiny")' in seen["card"] and seen["same"]
    with pytest.raises(DigitError, match="repository id"):
        pipe.push_to_hub("not a repo id")

    class Refused(huggingface_hub.errors.HfHubHTTPError):
        def __init__(self, message):
            Exception.__init__(self, message)

    class UnauthorizedApi(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise Refused("401 Client Error: Unauthorized\nInvalid credentials")

    monkeypatch.setattr(huggingface_hub, "HfApi", UnauthorizedApi)
    with pytest.raises(DigitError, match="refused the upload to someone/digit-tiny: 401 Client Error: Unauthorized$"):
        pipe.push_to_hub("someone/digit-tiny")

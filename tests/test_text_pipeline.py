"""Text-to-image end to end: `digit generate --prompt` (DiGIT: text GPT on discriminative tokens -> stage-2 decoder ->
VQ; LlamaGen: text GPT on VQ tokens -> VQ), the Python API with prompts, and save/load of a text-conditional folder
with its text encoder. Tiny random-weight models, the deterministic random test encoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from digit import DigitError, Pipeline, SamplingParams
from digit.cli import main
from digit.data.text_features import RandomTextEncoder
from digit.models.conditions import left_pad_captions
from digit.sampling.generate import sample
from digit.sampling.seeds import image_generators
from test_api import DISC_TOKENIZER, _write_run

ENCODER = {"kind": "random-test", "dim": 8, "max_length": 12, "seed": 1}
PROMPTS = ["a red circle", "two blue squares"]


def write_encoder(path: Path, **kw) -> Path:
    path.mkdir(parents=True)
    (path / "text_encoder.json").write_text(json.dumps({**ENCODER, **kw}))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A text encoder dir; a DiGIT folder (text stage 1 on discriminative tokens, prefix decoder, VQ) and a LlamaGen
    folder (text stage 1 on VQ tokens, VQ); a class-conditional LlamaGen folder for the refusals."""
    from digit.models import build_config
    from digit.tokenizers.vq import VQModel

    root = tmp_path_factory.mktemp("t2i")
    enc = write_encoder(root / "enc")
    identity = RandomTextEncoder(dim=8, max_length=12, seed=1).identity()
    torch.manual_seed(0)
    vq = VQModel.from_preset("tiny", image_size=16, codebook_size=32)
    common = {"n_images": 4}
    disc_meta = {**common, "grid": [2, 2], "vocab_size": 16, "tokenizer": DISC_TOKENIZER}
    vq_meta = {**common, "grid": [4, 4], "vocab_size": 32, "tokenizer": vq.config()}
    text = dict(cond="text", caption_len=12, caption_dim=8)
    s1 = build_config("tiny", vocab_size=16, grid=(2, 2), **text)
    dec = build_config("tiny", vocab_size=32, grid=(4, 4), cond="prefix", prefix_vocab_size=16, prefix_grid=(2, 2))
    s1_vq = build_config("tiny", vocab_size=32, grid=(4, 4), **text)
    s1_cls = build_config("tiny", vocab_size=32, grid=(4, 4), cond="class", num_classes=2)
    out = {"root": root, "enc": enc}
    for name in ("digit", "llamagen", "classes"):
        vq.save(root / name / "vq")
        out[name] = root / name
    _write_run(root / "digit" / "stage1", s1, disc_meta)
    _write_run(root / "digit" / "stage2", dec, vq_meta, prefix_meta=disc_meta, seed=1)
    _write_run(root / "llamagen" / "stage1", s1_vq, vq_meta, seed=2)
    _write_run(root / "classes" / "stage1", s1_cls, vq_meta, seed=3)
    for name in ("digit", "llamagen"):  # as `digit train --text-cond` records the encoder of the stored features
        cfg_path = root / name / "stage1" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["data"]["text_encoder"] = identity
        cfg_path.write_text(json.dumps(cfg))
    return out


def generate(folder: Path, out: Path, *args: str) -> int:
    pieces = ["--stage1", str(folder / "stage1"), "--vq", str(folder / "vq")]
    if (folder / "stage2").is_dir():
        pieces += ["--decoder", str(folder / "stage2")]
    return main(["generate", *pieces, *args, "--out", str(out)])


@pytest.mark.parametrize("kind", ["digit", "llamagen"])
def test_generate_by_prompt_equals_the_api_and_the_direct_sampler(folders, tmp_path, kind, capsys):
    folder, enc = folders[kind], folders["enc"]
    out = tmp_path / "gen"
    args = ["--text-encoder", str(enc), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "-n", "3"]
    args += ["--cfg-scale", "2.5", "--top-k", "8", "--seed", "4", "--batch-size", "2"]
    assert generate(folder, out, *args) == 0, capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prompts"] == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]  # -n spread round-robin over the prompts
    assert meta["text_encoder"]["sha256"] == RandomTextEncoder(dim=8, max_length=12, seed=1).identity()["sha256"]
    assert meta["sampling"]["stage1"]["cfg_scale"] == 2.5
    with np.load(out / "samples.npz") as z:
        cli_images, labels = z["images"], z["labels"]
    assert cli_images.shape == (3, 16, 16, 3) and labels.tolist() == [-1, -1, -1]
    # the Python API: the same pixels with the same seed, at any batch size
    pipe = Pipeline.from_runs(folder / "stage1", folder / "vq", folder / "stage2" if kind == "digit" else None,
                              text_encoder=enc)  # fmt: skip
    res = pipe(prompts=PROMPTS, num_images=3, seed=4, cfg_scale=2.5, top_k=8, batch_size=1, return_tokens=True)
    assert np.array_equal(np.stack([np.asarray(im) for im in res.images]), cli_images)
    assert res.prompts == meta["prompts"]
    # stage 1 is the text GPT sampled directly on the encoder's left-padded captions with image i's generator
    feats, mask = RandomTextEncoder(dim=8, max_length=12, seed=1).encode(meta["prompts"])
    cap = left_pad_captions(torch.from_numpy(feats), torch.from_numpy(mask))
    params = SamplingParams(cfg_scale=2.5, top_k=8)
    want = sample(pipe.stage1, cap, params=params, generator=image_generators(4, range(3))).tokens
    assert np.array_equal(res.tokens, want.numpy())
    # the prompt matters: images 0 and 2 share a caption (other seeds), image 1 has another; with the same seed
    # stream, a single image of the second prompt differs from one of the first
    first = pipe(prompts=[PROMPTS[0]], seed=0, temperature=0.0)
    second = pipe(prompts=[PROMPTS[1]], seed=0, temperature=0.0)
    assert not np.array_equal(np.asarray(first[0]), np.asarray(second[0]))


def test_prompts_file_and_refusals(folders, tmp_path, capsys):
    enc, text, classes = folders["enc"], folders["llamagen"], folders["classes"]
    (tmp_path / "p.txt").write_text(f"{PROMPTS[1]}\n\n  {PROMPTS[0]}  \n", encoding="utf-8")
    assert generate(text, tmp_path / "f", "--text-encoder", str(enc), "--prompts", str(tmp_path / "p.txt")) == 0
    assert json.loads((tmp_path / "f" / "meta.json").read_text())["prompts"] == [PROMPTS[1], PROMPTS[0]]
    other = write_encoder(tmp_path / "enc2", seed=2)
    cases = [
        (text, ["--text-encoder", str(enc), "--prompt", "x", "--classes", "0"], "--classes given but --stage1 is text"),
        (text, ["--prompt", "x"], "needs --prompt TEXT (or --prompts FILE) and --text-encoder DIR"),
        (text, ["--text-encoder", str(enc), "-n", "2"], "needs --prompt TEXT"),
        (text, ["--text-encoder", str(other), "--prompt", "x"], "not the encoder this run was trained with"),
        (text, ["--text-encoder", str(enc), "--prompt", "a", "--prompt", "b", "-n", "1"], "fewer than the 2 prompts"),
        (text, ["--text-encoder", str(enc), "--prompt", " "], "non-empty"),
        (classes, ["--prompt", "x", "-n", "2"], "need a text-conditional --stage1"),
        (classes, ["--text-encoder", str(enc), "--prompt", "x"], "not text"),
    ]
    capsys.readouterr()
    for i, (folder, args, msg) in enumerate(cases):
        assert generate(folder, tmp_path / f"bad{i}", *args) == 2, (args, capsys.readouterr())
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (args, err)


def test_api_refusals(folders):
    pipe = Pipeline.from_pretrained(folders["llamagen"], text_encoder=folders["enc"])
    assert pipe.is_text and pipe.num_classes == 0
    with pytest.raises(DigitError, match="classes given but this pipeline is text-conditional"):
        pipe(classes=[0])
    with pytest.raises(DigitError, match="pass prompts"):
        pipe(num_images=2)
    with pytest.raises(DigitError, match="fewer than the 2 prompts"):
        pipe(prompts=PROMPTS, num_images=1)
    with pytest.raises(DigitError, match="must be a string"):
        pipe(prompts=["ok", 3])
    with pytest.raises(DigitError, match="non-empty"):
        pipe(prompts=[])
    assert len(pipe(prompts="one caption", num_images=2, temperature=0.0)) == 2  # a string: one prompt
    cls = Pipeline.from_pretrained(folders["classes"])
    with pytest.raises(DigitError, match="prompts given"):
        cls(prompts=["a red circle"])


def test_save_and_load_a_text_pipeline(folders, tmp_path):
    enc = folders["enc"]
    pipe = Pipeline.from_pretrained(folders["digit"], text_encoder=enc)
    ref = pipe(prompts=PROMPTS, seed=2, cfg_scale=2.0)
    saved = pipe.save_pretrained(tmp_path / "saved", text_encoder="reference")
    meta = json.loads((saved / "pipeline.json").read_text())
    assert meta["text_encoder"]["path"] == str(enc.resolve())
    assert meta["text_encoder"]["copied"] is False and not (saved / "text_encoder").exists()
    assert 'text_encoder="path/to/its/text-encoder"' in (saved / "README.md").read_text()
    assert meta["text_encoder"]["identity"] == RandomTextEncoder(dim=8, max_length=12, seed=1).identity()
    assert "pipeline_tag: text-to-image" in (saved / "README.md").read_text()

    def pixels(p: Pipeline) -> np.ndarray:
        return np.stack([np.asarray(im) for im in p(prompts=PROMPTS, seed=2, cfg_scale=2.0)])

    want = np.stack([np.asarray(im) for im in ref])
    assert np.array_equal(pixels(Pipeline.from_pretrained(saved)), want)  # the recorded encoder directory
    moved = shutil.copytree(enc, tmp_path / "moved")
    shutil.rmtree(tmp_path / "enc_gone", ignore_errors=True)
    # the recorded directory gone: a one-line error naming what to pass, then text_encoder= or text_encoder/ work
    record = dict(meta, text_encoder={**meta["text_encoder"], "path": str(tmp_path / "enc_gone")})
    (saved / "pipeline.json").write_text(json.dumps(record))
    with pytest.raises(DigitError, match=r"no text encoder was found \(recorded at .*enc_gone.*pass text_encoder=DIR"):
        Pipeline.from_pretrained(saved)
    assert np.array_equal(pixels(Pipeline.from_pretrained(saved, text_encoder=moved)), want)
    shutil.copytree(enc, saved / "text_encoder")
    assert np.array_equal(pixels(Pipeline.from_pretrained(saved)), want)
    wrong = write_encoder(tmp_path / "wrong", seed=5)
    with pytest.raises(DigitError, match="not the encoder this run was trained with"):
        Pipeline.from_pretrained(saved, text_encoder=wrong)
    # a pipeline without its encoder (built by hand) refuses prompts with the same advice
    bare = Pipeline(pipe.stage1, pipe.stage1_config, pipe.vq, pipe.decoder, pipe.decoder_config, pipe.kind)
    with pytest.raises(DigitError, match="has no text encoder: load it with text_encoder=DIR"):
        bare(prompts=PROMPTS)


def test_save_pretrained_copies_a_small_text_encoder(folders, tmp_path, monkeypatch):
    """A small encoder travels inside the folder (auto), so the folder loads with the original directory gone; a large
    one is only recorded; "copy" forces it; the copy hashes to the same identity."""
    import digit.hub as hub

    enc = shutil.copytree(folders["enc"], tmp_path / "enc")
    pipe = Pipeline.from_pretrained(folders["digit"], text_encoder=enc)
    want = np.stack([np.asarray(im) for im in pipe(prompts=PROMPTS, seed=3, cfg_scale=2.0)])
    saved = pipe.save_pretrained(tmp_path / "saved")
    meta = json.loads((saved / "pipeline.json").read_text())
    assert meta["text_encoder"]["copied"] is True
    assert sorted(p.name for p in (saved / "text_encoder").iterdir()) == sorted(
        p.name for p in enc.iterdir() if not p.name.startswith(".")
    )
    assert 'text_encoder="path/to/its/text-encoder"' not in (saved / "README.md").read_text()
    shutil.rmtree(enc)  # the original is gone: the folder's own copy is used, and it is the same encoder
    again = Pipeline.from_pretrained(saved)
    assert again.text_encoder.identity() == meta["text_encoder"]["identity"]
    got = np.stack([np.asarray(im) for im in again(prompts=PROMPTS, seed=3, cfg_scale=2.0)])
    assert np.array_equal(got, want)

    monkeypatch.setattr(hub, "TEXT_ENCODER_COPY_LIMIT", 10)  # bytes: now "too large" for auto
    big = again.save_pretrained(tmp_path / "big")
    assert not (big / "text_encoder").exists()
    assert json.loads((big / "pipeline.json").read_text())["text_encoder"]["copied"] is False
    forced = again.save_pretrained(tmp_path / "forced", text_encoder="copy")
    assert (forced / "text_encoder").is_dir()
    with pytest.raises(DigitError, match="text_encoder must be one of auto, copy, reference"):
        again.save_pretrained(tmp_path / "bad", text_encoder="yes")


def test_api_text_encoder_from_a_hub_id(folders, tmp_path, monkeypatch):
    """``text_encoder="owner/name"``: the local hub cache's snapshot (from_runs and from_pretrained alike); a miss
    says how to get it; ``download_text_encoder=True`` asks for the download."""
    from huggingface_hub import constants

    from test_text_encoder_hub import _online, cache_repo

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    folder, want = folders["llamagen"], RandomTextEncoder(dim=8, max_length=12, seed=1).identity()
    with pytest.raises(DigitError, match=r"text_encoder= owner/enc: not a directory, nor in the local Hugging Face "
                       r"cache: run `hf download owner/enc .*` or pass download_text_encoder=True"):  # fmt: skip
        Pipeline.from_pretrained(folder, text_encoder="owner/enc")
    snap = cache_repo(tmp_path / "cache", "owner/enc", {"text_encoder.json": json.dumps(ENCODER).encode()})
    for pipe in (Pipeline.from_runs(folder / "stage1", folder / "vq", text_encoder="owner/enc"),
                 Pipeline.from_pretrained(folder, text_encoder="owner/enc")):  # fmt: skip
        assert pipe.text_encoder_dir == snap and pipe.text_encoder.identity() == want
    calls = _online(monkeypatch, {"text_encoder.json": json.dumps(ENCODER).encode()}, tmp_path / "dl")
    pipe = Pipeline.from_pretrained(folder, text_encoder="owner/new", download_text_encoder=True)
    assert pipe.text_encoder.identity() == want and [c["local_files_only"] for c in calls] == [False]

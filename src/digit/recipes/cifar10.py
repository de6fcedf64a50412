"""The CIFAR-10 reference recipe: the whole system trained in order, then the paper's three claims measured.

    digit recipe cifar10 --data cifar10-train.tar.gz --out runs/cifar10 [--size cpu|small]

Steps (each a plain `digit` command, printed as it runs; see :mod:`digit.recipes.runner`):
 split -> encoder (DINO) -> tokenizer (K-means) -> tokens -> vq -> vq-tokens -> stage1 (GPT on discriminative tokens)
 -> stage2 (decoder to VQ tokens) -> gpt-vq (the same GPT on VQ tokens) -> eval-encoder (a second DINO run, another
 architecture and seed, used only to measure) -> samples of both pipelines -> FD in the evaluation encoder's space,
 linear probes, token stability.

Sizes: ``cpu`` is what one 2-core machine trains in about 90 minutes (the reference run in results/cifar10.md); ``small``
is a few-minute version on a 2,500-image subset (what `digit demo` runs when no reference models are shipped); ``tiny``
runs every step in seconds on a handful of images (the test suite's end-to-end check; its figures mean nothing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digit.recipes.runner import Step


@dataclass(frozen=True)
class RecipeSize:
    val: int  # held-out validation images
    limit: int | None  # total images used (train + val); None = all
    encoder_epochs: float
    eval_encoder_epochs: float
    clusters: int
    vq_steps: int
    gpt_steps: int
    decoder_steps: int
    batch: int
    encoder_batch: int
    vq_batch: int
    samples: int
    probe_train: int
    probe_epochs: int


SIZES: dict[str, RecipeSize] = {
    "cpu": RecipeSize(val=5000, limit=None, encoder_epochs=3, eval_encoder_epochs=1, clusters=512, vq_steps=1500,
                      gpt_steps=600, decoder_steps=300, batch=128, encoder_batch=128, vq_batch=64, samples=10000,
                      probe_train=10000, probe_epochs=10),
    "small": RecipeSize(val=500, limit=2500, encoder_epochs=2, eval_encoder_epochs=1, clusters=128, vq_steps=60,
                        gpt_steps=60, decoder_steps=60, batch=64, encoder_batch=128, vq_batch=64, samples=500, probe_train=2000,
                        probe_epochs=5),
    # seconds: the suite's end-to-end check of every step on a few generated images
    "tiny": RecipeSize(val=10, limit=None, encoder_epochs=1, eval_encoder_epochs=1, clusters=16, vq_steps=2,
                       gpt_steps=2, decoder_steps=2, batch=8, encoder_batch=16, vq_batch=8, samples=10, probe_train=20,
                       probe_epochs=1),
}  # fmt: skip

# ViT shapes at patch 4 on 32x32 images (an 8x8 token grid). The evaluation encoder differs in width, depth, heads and
# seed, so neither pipeline's features are the ones that score it.
ENCODER = {"patch_size": 4, "depth": 4, "embed_dim": 128, "num_heads": 4}
EVAL_ENCODER = {"patch_size": 4, "depth": 6, "embed_dim": 96, "num_heads": 3}
GPT = ["--model", "small", "--dim", "192", "--layers", "4", "--heads", "6"]
SAMPLING = ["--cfg-scale", "2.0", "--top-k", "100"]


def _num(x: float) -> str:
    return f"{round(x, 4):g}"


def _dino(data: str, out: str, kwargs: dict, epochs: float, batch: int, seed: int) -> list[str]:
    argv = [
        "encoder", "pretrain", "--data", f"{data}/train", "--val", f"{data}/val", "--knn-bank", "10000",
        "--encoder", "vit_tiny_patch16_224", "--encoder-kwargs", json.dumps(kwargs), "--image-size", "32",
        "--local-size", "16", "--local-crops", "2", "--epochs", _num(epochs), "--warmup-epochs", _num(0.1 * epochs),
        "--warmup-teacher-temp-epochs", _num(epochs / 3), "--freeze-last-layer-epochs", _num(0.2 * epochs / 3),
        "--batch-size", str(batch), "--lr", "1e-3", "--out-dim", "1024", "--hidden-dim", "512",
        "--bottleneck-dim", "128", "--momentum-teacher", "0.99", "--seed", str(seed),
        # what `encoder pretrain` defaulted to before the trainer flags were shared: views rendered in CPU workers,
        # a checkpoint about every epoch of the cpu size (351 steps)
        "--workers", str(min(4, os.cpu_count() or 1)), "--save-every", "300", "--out", out,
    ]  # fmt: skip
    return argv


def cifar10_steps(data: str, size: str = "cpu", seed: int = 0) -> list[Step]:
    """The recipe's steps. ``data``: the CIFAR-10 archive or folder (any labelled 32x32 ImageFolder works)."""
    from digit.data.split import split_folders

    s = SIZES[size]
    d = "data"

    def split(root: Path) -> dict[str, Any]:
        return split_folders(data, root / d, s.val, seed=seed, limit=s.limit)

    def tokenize(tok: str, split_name: str, out: str) -> Step:
        flip = ["--flip"] if split_name == "train" else []
        return Step(f"{out}", ["tokenize", "--tokenizer", tok, "--data", f"{d}/{split_name}", *flip, "--out", out],
                    out=out, what=f"tokenize the {split_name} split with {tok}")  # fmt: skip

    def gpt(out: str, tokens: str, steps: int, extra: list[str], what: str) -> Step:
        argv = ["train", "--tokens", f"{tokens}-train", "--val-tokens", f"{tokens}-val", *GPT, *extra,
                "--steps", str(steps), "--batch-size", str(s.batch), "--lr", "1e-3", "--schedule", "cosine",
                "--warmup", str(max(steps // 10, 1)), "--eval-every", str(max(steps // 4, 1)), "--seed", str(seed),
                "--out", out]  # fmt: skip
        return Step(out, argv, out=out, resumable=True, what=what)

    gen_n = ["-n", str(s.samples), "--batch-size", "250", *SAMPLING, "--seed", str(seed)]
    eval_fd = ["--ref", f"{d}/val", "--features", "eval-encoder", "--min-images", str(min(s.samples, s.val))]
    probe = ["--train-limit", str(s.probe_train), "--epochs", str(s.probe_epochs), "--seed", str(seed)]
    steps = [
        Step("split", [], out=d, call=split, what=f"hold out {s.val} validation images (seed {seed})"),
        Step("encoder", _dino(d, "encoder", ENCODER, s.encoder_epochs, s.encoder_batch, seed), out="encoder",
             resumable=True, what="1. discriminative encoder: DINO on the training split"),
        Step("tokenizer", ["tokenizer", "fit", "--data", f"{d}/train", "--encoder", "encoder", "--layer", "1",
                           "--clusters", str(s.clusters), "--sample-frac", "0.1", "--seed", str(seed),
                           "--out", "tokenizer"], out="tokenizer",
             what="2. K-means tokenizer on the encoder's features after block 3 of 4 + final norm"),
        tokenize("tokenizer", "train", "tokens-train"),
        tokenize("tokenizer", "val", "tokens-val"),
        Step("vq", ["vq", "train", "--data", f"{d}/train", "--preset", "tiny", "--codebook-size", str(s.clusters),
                    "--steps", str(s.vq_steps), "--batch-size", str(s.vq_batch), "--lr", "1e-3", "--disc-weight", "0", "--entropy-weight", "0.1",
                    "--seed", str(seed), "--out", "vq"], out="vq", resumable=True,
             what="3. VQ tokenizer (tiny VQGAN, 8x8 codes, same codebook size, entropy loss for code usage)"),
        tokenize("vq", "train", "vq-tokens-train"),
        tokenize("vq", "val", "vq-tokens-val"),
        gpt("stage1", "tokens", s.gpt_steps, ["--class-cond"], "4. class-conditional GPT on discriminative tokens"),
        gpt("stage2", "vq-tokens", s.decoder_steps,
            ["--prefix-tokens", "tokens-train", "--val-prefix-tokens", "tokens-val"],
            "5. stage-2 decoder: discriminative tokens (prefix) -> VQ tokens"),
        gpt("gpt-vq", "vq-tokens", s.gpt_steps, ["--class-cond"], "6. the same GPT on VQ tokens (the comparison)"),
        Step("eval-encoder", _dino(d, "eval-encoder", EVAL_ENCODER, s.eval_encoder_epochs, s.encoder_batch, seed + 1),
             out="eval-encoder", resumable=True, what="evaluation encoder (other architecture and seed)"),
        Step("samples-digit", ["generate", "--stage1", "stage1", "--decoder", "stage2", "--vq", "vq", *gen_n,
                               "--out", "samples-digit"], out="samples-digit",
             what=f"{s.samples} samples: stage 1 -> stage 2 -> VQ decoder"),
        Step("samples-vq", ["generate", "--stage1", "gpt-vq", "--vq", "vq", *gen_n, "--out", "samples-vq"],
             out="samples-vq", what=f"{s.samples} samples: GPT on VQ tokens -> VQ decoder"),
        Step("fd-digit", ["eval", "--gen", "samples-digit", *eval_fd, "--out", "fd-digit.json"], out="fd-digit.json",
             what="FID-proxy of the discriminative-token pipeline"),
        Step("fd-vq", ["eval", "--gen", "samples-vq", *eval_fd, "--out", "fd-vq.json"], out="fd-vq.json",
             what="FID-proxy of the VQ-token pipeline"),
        Step("fd-train", ["eval", "--gen", f"{d}/train", *eval_fd, "--out", "fd-train.json"], out="fd-train.json",
             what="FID-proxy floor: real training images against the validation split"),
        Step("probe-digit", ["probe", "--run", "stage1", "--tokens", "tokens-train", "--val-tokens", "tokens-val",
                             *probe, "--out", "probe-digit.json"], out="probe-digit.json",
             what="linear probes on every layer, GPT on discriminative tokens"),
        Step("probe-vq", ["probe", "--run", "gpt-vq", "--tokens", "vq-tokens-train", "--val-tokens",
                          "vq-tokens-val", *probe, "--out", "probe-vq.json"], out="probe-vq.json",
             what="linear probes on every layer, GPT on VQ tokens"),
        Step("stability-digit", ["stability", "--tokenizer", "tokenizer", "--data", f"{d}/val", "--snr", "30", "20",
                                 "10", "--seed", str(seed), "--out", "stability-digit.json"],
             out="stability-digit.json", what="token stability under pixel noise, discriminative tokenizer"),
        Step("stability-vq", ["stability", "--tokenizer", "vq", "--data", f"{d}/val", "--snr", "30", "20", "10",
                              "--seed", str(seed), "--out", "stability-vq.json"], out="stability-vq.json",
             what="token stability under pixel noise, VQ tokenizer"),
    ]  # fmt: skip
    return steps

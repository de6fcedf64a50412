"""The CIFAR-10 reference recipe: the whole system trained in order, then the paper's three claims measured.

    digit recipe cifar10 --data cifar10-train.tar.gz --out runs/cifar10 [--size cpu|small|tiny]
                         [--encoder dino effnet] [--seeds 0 1 2]

One recipe directory holds every route and seed; what does not depend on them is done once and shared:
 shared      split -> VQ tokenizer -> VQ tokens; FID reference statistics (Inception and the FD encoder, computed once
             on a seeded subset of the training split); stability of the VQ tokens
 per route   (``--encoder``) discriminative encoder -> K-means tokenizer -> tokens; stability of its tokens
             dino:    a ViT trained with DINO on the training split, on CPU (the first reference run's encoder)
             effnet:  the ImageNet-pretrained EfficientNet-Lite0 of the weights package, stride-16 map at 128 px (8x8)
             distill: a small ViT (32 px, 8x8, 192 wide) distilled from that frozen EfficientNet-Lite0
                      (`digit encoder pretrain --teacher`), so the tokenizer runs at 32 px
 per seed    (``--seeds``) the GPT on VQ tokens, and per route the stage-1 GPT and the stage-2 decoder (same size,
             steps and batch for both token types); 10,000 samples of each pipeline; Inception FID and the FD in
             EfficientNet-Lite1 (a network neither pipeline uses) against the training-set statistics; linear probes

Layout: ``data/``, ``vq/``, ``vq-tokens-*/``, ``fid/`` shared; ``seed<S>/`` the VQ-token GPT of seed S and its
figures; ``<route>/`` a route's encoder, tokenizer and tokens; ``<route>/seed<S>/`` its stage 1, stage 2 and figures.
A second invocation with another route or more seeds reuses every finished step.

Sizes: ``cpu`` is what one 2-core machine trains (results/cifar10.md gives the CPU time of each step); ``small`` is a
few-minute version on a 2,500-image subset (what `digit demo` trains when no reference models are shipped); ``tiny``
runs every step in seconds on a handful of images (the test suite's end-to-end check; its figures mean nothing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digit.recipes.runner import Step, StepResult, finished_steps


@dataclass(frozen=True)
class RecipeSize:
    val: int  # held-out validation images
    limit: int | None  # total images used (train + val); None = all
    encoder_epochs: float
    clusters: int
    vq_steps: int
    gpt_steps: int  # stage 1 and the VQ-token GPT (the same, so the token types are compared at equal training)
    decoder_steps: int
    batch: int
    encoder_batch: int
    vq_batch: int
    samples: int  # per pipeline and seed, scored by FID
    fid_ref: int  # training images behind the reference statistics (a seeded subset; 0 = the whole training split)
    probe_train: int
    probe_epochs: int
    knn_bank: int = 0  # training images in the tokenizer-feature kNN bank (a seeded subset; 0 = all)
    inception_layer: str = (
        "2048"  # pool3 (FID); tiny stops at the first block ("64") to stay fast: its FID means nothing
    )


SIZES: dict[str, RecipeSize] = {
    # GPT steps: the first run's stage 1 (600 steps, 0.85 of an epoch of the 90,000 flipped rows) was still improving
    # (val loss 3.442 -> 3.356 -> 3.334 at 300/450/600); 1,500 steps are 2.1 epochs. Stage 2 (300 steps there, val
    # loss no better than the VQ GPT's) gets the same 1,500.
    "cpu": RecipeSize(val=5000, limit=None, encoder_epochs=3, clusters=512, vq_steps=1500, gpt_steps=1500,
                      decoder_steps=1500, batch=128, encoder_batch=128, vq_batch=64, samples=10000, fid_ref=10000,
                      probe_train=10000, probe_epochs=10, knn_bank=10000),
    "small": RecipeSize(val=500, limit=2500, encoder_epochs=2, clusters=128, vq_steps=60, gpt_steps=60,
                        decoder_steps=60, batch=64, encoder_batch=128, vq_batch=64, samples=500, fid_ref=500,
                        probe_train=2000, probe_epochs=5, knn_bank=2000),
    # seconds: the suite's end-to-end check of every step on a few generated images
    "tiny": RecipeSize(val=10, limit=None, encoder_epochs=1, clusters=16, vq_steps=2, gpt_steps=2, decoder_steps=2,
                       batch=8, encoder_batch=16, vq_batch=8, samples=10, fid_ref=20, probe_train=20, probe_epochs=1,
                       inception_layer="64"),
}  # fmt: skip

# ViT shapes at patch 4 on 32x32 images (an 8x8 token grid)
ENCODER = {"patch_size": 4, "depth": 4, "embed_dim": 128, "num_heads": 4}
# the distilled student of results/encoders.md's best run (run A: 52.6% kNN, 5.7 / 18.1 / 49.3% token change): wider
# than the DINO route's ViT, constant weight decay, bf16 student
STUDENT = {"patch_size": 4, "depth": 4, "embed_dim": 192, "num_heads": 3}
EFFNET = "tf_efficientnet_lite0"  # packaged ImageNet weights (digit.weights); stride 16 at 128 px = the 8x8 grid
EFFNET_SIZE = 128
FD_ENCODER = "tf_efficientnet_lite1"  # evaluation only: packaged weights, a network no tokenizer here uses
GPT = ["--model", "small", "--dim", "192", "--layers", "4", "--heads", "6"]
SAMPLING = ["--cfg-scale", "2.0", "--top-k", "100"]
ROUTES = ("dino", "effnet", "distill")
ROUTE_HELP = {
    "dino": "a ViT trained with DINO on the training split (CPU-sized, the first reference run's encoder)",
    "effnet": f"the pretrained {EFFNET} (--encoder-weights auto), stride-16 map at {EFFNET_SIZE} px",
    "distill": f"a small ViT (32 px, 192 wide) distilled from the frozen pretrained {EFFNET} (encoder pretrain --teacher)",
}


@dataclass(frozen=True)
class RecipePlan:
    """What one invocation runs: the data, the size, the encoder routes and the GPT seeds."""

    data: str  # the CIFAR-10 archive or folder (any labelled 32x32 ImageFolder works)
    size: str = "cpu"
    routes: tuple[str, ...] = ("dino",)
    seeds: tuple[int, ...] = (0,)
    seed: int = 0  # of the shared side: split, encoder, K-means, VQ, FID reference subset
    fid_ref: int | None = None  # None: the size's

    @property
    def sizes(self) -> RecipeSize:
        return SIZES[self.size]

    @property
    def fid_ref_count(self) -> int:
        return self.sizes.fid_ref if self.fid_ref is None else self.fid_ref


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


D = "data"  # the split, shared by every step


def _tokenize(tok: str, split_name: str, out: str) -> Step:
    flip = ["--flip"] if split_name == "train" else []
    return Step(out, ["tokenize", "--tokenizer", tok, "--data", f"{D}/{split_name}", *flip, "--out", out], out=out,
                what=f"tokenize the {split_name} split with {tok}")  # fmt: skip


def _gpt(s: RecipeSize, out: str, tokens: str, steps: int, extra: list[str], seed: int, what: str) -> Step:
    argv = ["train", "--tokens", f"{tokens}-train", "--val-tokens", f"{tokens}-val", *GPT, *extra,
            "--steps", str(steps), "--batch-size", str(s.batch), "--lr", "1e-3", "--schedule", "cosine",
            "--warmup", str(max(steps // 10, 1)), "--eval-every", str(max(steps // 4, 1)), "--seed", str(seed),
            "--out", out]  # fmt: skip
    return Step(out, argv, out=out, resumable=True, what=what)


def _stability(tok: str, out: str, seed: int, what: str) -> Step:
    argv = ["stability", "--tokenizer", tok, "--data", f"{D}/val", "--snr", "30", "20", "10", "--seed", str(seed),
            "--out", out]  # fmt: skip
    return Step(out, argv, out=out, what=what)


def shared_steps(plan: RecipePlan) -> list[Step]:
    """Split, VQ side, FID reference statistics: independent of the encoder route and of the GPT seeds."""
    from digit.recipes.fidsteps import fid_reference_steps

    s, seed = plan.sizes, plan.seed

    def split(root: Path) -> dict[str, Any]:
        from digit.data.split import split_folders

        return split_folders(plan.data, root / D, s.val, seed=seed, limit=s.limit)

    return [
        Step("split", [], out=D, call=split, what=f"hold out {s.val} validation images (seed {seed})",
             key=json.dumps({"data": plan.data, "val": s.val, "limit": s.limit, "seed": seed})),
        Step("vq", ["vq", "train", "--data", f"{D}/train", "--preset", "tiny", "--codebook-size", str(s.clusters),
                    "--steps", str(s.vq_steps), "--batch-size", str(s.vq_batch), "--lr", "1e-3", "--disc-weight", "0",
                    "--entropy-weight", "0.1", "--seed", str(seed), "--out", "vq"], out="vq", resumable=True,
             what="VQ tokenizer (tiny VQGAN, 8x8 codes, same codebook size, entropy loss for code usage)"),
        _tokenize("vq", "train", "vq-tokens-train"),
        _tokenize("vq", "val", "vq-tokens-val"),
        _stability("vq", "stability-vq.json", seed, "token stability under pixel noise, VQ tokenizer"),
        *fid_reference_steps(plan),
    ]  # fmt: skip


def route_steps(plan: RecipePlan, route: str) -> list[Step]:
    """The discriminative tokenizer of one encoder route and its tokens (no seed: shared by the route's GPTs)."""
    s, seed = plan.sizes, plan.seed
    r = route
    if route == "dino":
        steps = [
            Step(
                f"{r}/encoder",
                _dino(D, f"{r}/encoder", ENCODER, s.encoder_epochs, s.encoder_batch, seed),
                out=f"{r}/encoder",
                resumable=True,
                what="discriminative encoder: DINO on the training split",
            )
        ]
        fit = ["--encoder", f"{r}/encoder", "--layer", "1"]
        what = "K-means tokenizer on the DINO ViT's features after block 3 of 4 + final norm"
    elif route == "effnet":
        steps = []
        fit = ["--encoder", EFFNET, "--encoder-weights", "auto", "--layer", "stride16", "--image-size",
               str(EFFNET_SIZE)]  # fmt: skip
        what = f"K-means tokenizer on pretrained {EFFNET} stride-16 features at {EFFNET_SIZE} px"
    elif route == "distill":
        argv = ["encoder", "pretrain", "--data", f"{D}/train", "--encoder", "vit_tiny_patch16_224", "--encoder-kwargs",
                json.dumps(STUDENT), "--image-size", "32", "--teacher", EFFNET, "--teacher-weights", "auto",
                "--teacher-size", str(EFFNET_SIZE), "--epochs", _num(s.encoder_epochs), "--warmup-epochs",
                _num(0.1 * s.encoder_epochs), "--batch-size", str(s.encoder_batch), "--lr", "1e-3", "--weight-decay", "0.05",
                "--weight-decay-end", "0.05", "--student-precision", "bf16", "--seed", str(seed),
                "--workers", str(min(4, os.cpu_count() or 1)),
                "--save-every", "300", "--out", f"{r}/encoder"]  # fmt: skip
        steps = [Step(f"{r}/encoder", argv, out=f"{r}/encoder", resumable=True,
                      what=f"discriminative encoder: the ViT distilled from the pretrained {EFFNET}")]  # fmt: skip
        # --smooth 3: a 3x3 average of the feature map (then layer norm) before K-means; on results/encoders.md's
        # run A (K=512) it cut token change at 30 / 20 / 10 dB from 5.7 / 18.1 / 49.3% to 3.8 / 12.6 / 39.6%
        fit = ["--encoder", f"{r}/encoder", "--layer", "1", "--smooth", "3"]
        what = "K-means tokenizer on the distilled ViT's output (last block + final norm), 3x3-smoothed"
    else:
        raise ValueError(f"unknown route {route!r}")
    tok = f"{r}/tokenizer"
    steps += [
        Step(tok, ["tokenizer", "fit", "--data", f"{D}/train", *fit, "--clusters", str(s.clusters), "--sample-frac",
                   "0.1", "--seed", str(seed), "--out", tok], out=tok, what=what),
        _tokenize(tok, "train", f"{r}/tokens-train"),
        _tokenize(tok, "val", f"{r}/tokens-val"),
        _stability(tok, f"{r}/stability.json", seed, f"token stability under pixel noise, {r} tokenizer"),
        # the same kNN protocol for every route (the DINO monitor's CLS kNN exists for one route only)
        Step(f"{r}/knn.json", ["tokenizer", "knn", "--tokenizer", tok, "--bank-data", f"{D}/train", "--data", f"{D}/val",
                               "--bank", str(s.knn_bank), "--seed", str(seed), "--out", f"{r}/knn.json"],
             out=f"{r}/knn.json", what=f"kNN top-1 on val of the {r} tokenizer's mean-pooled features"),
    ]  # fmt: skip
    return steps


def seed_steps(plan: RecipePlan, seed: int) -> list[Step]:
    """One GPT seed: every GPT first (the VQ-token GPT, shared by the routes, then each route's stage 1 and stage 2),
    so a seed's shippable models exist before its hour of sampling and scoring; then samples, figures and probes."""
    from digit.recipes.fidsteps import score_steps

    s = plan.sizes
    gen = ["-n", str(s.samples), "--batch-size", "250", *SAMPLING, "--seed", str(seed)]
    probe = ["--train-limit", str(s.probe_train), "--epochs", str(s.probe_epochs), "--seed", str(seed)]
    v = f"seed{seed}"
    train = [_gpt(s, f"{v}/gpt-vq", "vq-tokens", s.gpt_steps, ["--class-cond"], seed,
                  "the same class-conditional GPT on VQ tokens (the comparison)")]  # fmt: skip
    score = [
        Step(f"{v}/samples-vq", ["generate", "--stage1", f"{v}/gpt-vq", "--vq", "vq", *gen, "--out", f"{v}/samples-vq"],
             out=f"{v}/samples-vq", what=f"{s.samples} samples: GPT on VQ tokens -> VQ decoder"),
        *score_steps(plan, f"{v}/samples-vq", v, "vq"),
        Step(f"{v}/probe-vq.json", ["probe", "--run", f"{v}/gpt-vq", "--tokens", "vq-tokens-train", "--val-tokens",
                                    "vq-tokens-val", *probe, "--out", f"{v}/probe-vq.json"],
             out=f"{v}/probe-vq.json", what="linear probes on every layer, GPT on VQ tokens"),
    ]  # fmt: skip
    for r in plan.routes:
        rs = f"{r}/seed{seed}"
        train += [
            _gpt(s, f"{rs}/stage1", f"{r}/tokens", s.gpt_steps, ["--class-cond"], seed,
                 f"class-conditional GPT on {r} discriminative tokens"),
            _gpt(s, f"{rs}/stage2", "vq-tokens", s.decoder_steps,
                 ["--prefix-tokens", f"{r}/tokens-train", "--val-prefix-tokens", f"{r}/tokens-val"], seed,
                 f"stage-2 decoder: {r} discriminative tokens (prefix) -> VQ tokens"),
        ]  # fmt: skip
        score += [
            Step(f"{rs}/samples", ["generate", "--stage1", f"{rs}/stage1", "--decoder", f"{rs}/stage2", "--vq", "vq",
                                   *gen, "--out", f"{rs}/samples"], out=f"{rs}/samples",
                 what=f"{s.samples} samples: stage 1 -> stage 2 -> VQ decoder ({r})"),
            *score_steps(plan, f"{rs}/samples", rs, "digit"),
            Step(f"{rs}/probe.json", ["probe", "--run", f"{rs}/stage1", "--tokens", f"{r}/tokens-train",
                                      "--val-tokens", f"{r}/tokens-val", *probe, "--out", f"{rs}/probe.json"],
                 out=f"{rs}/probe.json", what=f"linear probes on every layer, GPT on {r} tokens"),
        ]  # fmt: skip
    return train + score


def cifar10_steps(plan: RecipePlan) -> list[Step]:
    """Every step of ``plan`` in the order they run: shared, each route's tokenizer, then seed by seed (so the first
    seed's complete comparison exists before the next seed starts)."""
    steps = shared_steps(plan)
    for r in plan.routes:
        steps += route_steps(plan, r)
    for seed in plan.seeds:
        steps += seed_steps(plan, seed)
    return steps


def finished_seeds(plan: RecipePlan, root: str | Path) -> tuple[list[StepResult], list[int]]:
    """The finished steps of the seeds of ``plan`` complete in every step, the shared side and each route's tokenizer
    included, and those seeds: a seed still running is left out (its steps too), not reported half-measured."""
    results = finished_steps(cifar10_steps(plan), root)
    done = {r.name for r in results}
    common = shared_steps(plan) + [s for r in plan.routes for s in route_steps(plan, r)]
    ready = [n for n in plan.seeds if all(s.name in done for s in common + seed_steps(plan, n))]
    keep = {s.name for s in common} | {s.name for n in ready for s in seed_steps(plan, n)}
    return [r for r in results if r.name in keep], ready


def training_steps(plan: RecipePlan) -> list[Step]:
    """Only what a shipped model folder needs (`digit demo`'s fallback): one route, one seed, no measurements."""
    (route,), (seed,) = plan.routes, plan.seeds
    keep = {"split", "vq", "vq-tokens-train", "vq-tokens-val", f"{route}/encoder", f"{route}/tokenizer",
            f"{route}/tokens-train", f"{route}/tokens-val", f"{route}/seed{seed}/stage1", f"{route}/seed{seed}/stage2"}  # fmt: skip
    return [s for s in cifar10_steps(plan) if s.name in keep]

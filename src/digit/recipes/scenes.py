"""The text-to-image measurement: prompt alignment of text-conditional GPTs on discriminative vs VQ tokens.

    digit recipe scenes --out runs/scenes [--size cpu|tiny]

Steps (each a plain `digit` command; see :mod:`digit.recipes.runner`): captioned scenes (held-out colour-shape pairs
kept out of training) -> the offline text encoder (tokenizer trained on the captions + a small random-init T5, not
pretrained) -> the attribute classifier (real renders) -> discriminative tokenizer (ImageNet EfficientNet-Lite0,
stride-16 map at 128 px: an 8x8 grid, K-means) and tiny VQ (8x8 codes) -> tokens with caption features ->
text-conditional GPTs on both token kinds (same size, steps, batch, lr, seed) + the stage-2 decoder -> samples by
prompt (seen and unseen pairs) with guidance and without -> alignment JSON -> ``summary.json`` / ``summary.md``.

Sizes: ``cpu`` fits about half an hour on a shared 2-core machine (results/scenes.md); ``tiny`` runs every step in
seconds (the test suite's end-to-end check; its figures mean nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digit.recipes.runner import Step, StepResult


@dataclass(frozen=True)
class ScenesSize:
    n: int  # training scenes
    n_classifier: int
    n_test: int
    n_prompts: int  # per group (seen, unseen)
    per_prompt: int  # samples per prompt
    classifier_epochs: int
    clusters: int
    vq_steps: int
    gpt_steps: int
    decoder_steps: int
    batch: int
    vq_batch: int


SIZES: dict[str, ScenesSize] = {
    "cpu": ScenesSize(n=3000, n_classifier=2000, n_test=500, n_prompts=24, per_prompt=4, classifier_epochs=8,
                      clusters=256, vq_steps=500, gpt_steps=500, decoder_steps=300, batch=64, vq_batch=64),
    "tiny": ScenesSize(n=24, n_classifier=24, n_test=12, n_prompts=2, per_prompt=1, classifier_epochs=1, clusters=8,
                       vq_steps=2, gpt_steps=2, decoder_steps=2, batch=8, vq_batch=8),
}  # fmt: skip

GPT = ["--model", "small", "--dim", "128", "--layers", "4", "--heads", "4"]
CFG_SCALES = (1.0, 3.0)
TEXT_LENGTH = 24  # caption tokens: the longest scenes caption is 14 words + </s>
PIPELINES = {"digit": "discriminative tokens -> stage 2 -> VQ", "vq": "VQ tokens -> VQ"}


def _cfg_name(scale: float) -> str:
    return f"cfg{scale:g}"


def scenes_steps(size: str = "cpu", seed: int = 0) -> list[Step]:
    s = SIZES[size]
    d, te = "data", "text-encoder"
    prompts = f"{d}/prompts.txt"

    def tokenize(tok: str, out: str) -> Step:
        return Step(out, ["tokenize", "--tokenizer", tok, "--data", f"{d}/train", "--captions", "--text-encoder", te,
                          "--text-length", str(TEXT_LENGTH), "--out", out], out=out,
                    what=f"tokenize train/ with {tok}, caption features from the text encoder (no flips: captions "
                         "name left and right)")  # fmt: skip

    def gpt(out: str, tokens: str, steps: int, extra: list[str], what: str) -> Step:
        argv = ["train", "--tokens", tokens, *GPT, *extra, "--steps", str(steps), "--batch-size", str(s.batch),
                "--lr", "1e-3", "--schedule", "cosine", "--warmup", str(max(steps // 10, 1)), "--seed", str(seed),
                "--out", out]  # fmt: skip
        return Step(out, argv, out=out, resumable=True, what=what)

    n_samples = 2 * s.n_prompts * s.per_prompt
    steps = [
        Step("data", ["scenes", "make", "--out", d, "--n", str(s.n), "--n-classifier", str(s.n_classifier),
                      "--n-test", str(s.n_test), "--n-prompts", str(s.n_prompts), "--size", "32", "--seed", str(seed)],
             out=d, what="captioned scenes, 32 px; red-triangle, green-circle, blue-square kept out of train/"),
        Step("text-encoder", ["text-encoder", "build", "--captions", f"{d}/train", "--seed", str(seed), "--out", te],
             out=te, what="tokenizer trained on the captions + a small T5 built from a config (random init, NOT "
                          "pretrained)"),
        Step("classifier", ["scenes", "classifier", "--data", d, "--epochs", str(s.classifier_epochs),
                            "--seed", str(seed), "--out", "classifier"], out="classifier",
             what="attribute classifier on real renders of every pair; scored on held-out renders"),
        Step("tokenizer", ["tokenizer", "fit", "--data", f"{d}/train", "--encoder", "tf_efficientnet_lite0",
                           "--encoder-weights", "auto", "--image-size", "128", "--layer", "stride16",
                           "--clusters", str(s.clusters), "--sample-frac", "0.5", "--no-augment", "--seed", str(seed),
                           "--out", "tokenizer"], out="tokenizer",
             what="discriminative tokenizer: ImageNet EfficientNet-Lite0 stride-16 map at 128 px (8x8), K-means"),
        tokenize("tokenizer", "tokens"),
        Step("vq", ["vq", "train", "--data", f"{d}/train", "--preset", "tiny", "--codebook-size", str(s.clusters),
                    "--steps", str(s.vq_steps), "--batch-size", str(s.vq_batch), "--lr", "1e-3", "--disc-weight", "0",
                    "--entropy-weight", "0.1", "--seed", str(seed), "--out", "vq"], out="vq", resumable=True,
             what="VQ tokenizer: tiny VQGAN, 8x8 codes, the same codebook size"),
        tokenize("vq", "vq-tokens"),
        gpt("stage1", "tokens", s.gpt_steps, ["--text-cond"], "text-conditional GPT on discriminative tokens"),
        gpt("stage2", "vq-tokens", s.decoder_steps, ["--prefix-tokens", "tokens"],
            "stage-2 decoder: discriminative tokens (prefix) -> VQ tokens"),
        gpt("gpt-vq", "vq-tokens", s.gpt_steps, ["--text-cond"], "the same text-conditional GPT on VQ tokens"),
    ]  # fmt: skip
    for scale in CFG_SCALES:
        for name in PIPELINES:
            out = f"samples-{name}-{_cfg_name(scale)}"
            pieces = ["--stage1", "stage1", "--decoder", "stage2"] if name == "digit" else ["--stage1", "gpt-vq"]
            steps.append(Step(out, ["generate", *pieces, "--vq", "vq", "--prompts", prompts, "--text-encoder", te,
                                    "-n", str(n_samples), "--cfg-scale", f"{scale:g}", "--seed", str(seed),
                                    "--out", out], out=out,
                              what=f"{n_samples} samples by prompt ({s.n_prompts} seen + {s.n_prompts} unseen), "
                                   f"{PIPELINES[name]}, CFG {scale:g}"))  # fmt: skip
            steps.append(Step(f"alignment-{name}-{_cfg_name(scale)}",
                              ["scenes", "alignment", "--classifier", "classifier", "--gen", out, "--prompts", prompts,
                               "--out", f"alignment-{name}-{_cfg_name(scale)}.json"],
                              out=f"alignment-{name}-{_cfg_name(scale)}.json",
                              what="prompt alignment of those samples"))  # fmt: skip
    return steps


FIGURE_COLUMNS = 6  # prompts per group shown in samples.png


def write_samples_figure(root: str | Path, upscale: int = 2) -> list[str] | None:
    """samples.png: one row per pipeline x CFG (the table's order), the first sample of the first FIGURE_COLUMNS seen
    prompts then of the first FIGURE_COLUMNS unseen ones. -> the rows' names (None when a sample set is missing)."""
    import numpy as np

    from digit.data.scenes import read_scenes_info
    from digit.utils.images import image_grid, save_png

    root = Path(root)
    prompts = (root / "data" / "prompts.txt").read_text(encoding="utf-8").splitlines()
    half = int(read_scenes_info(root / "data")["n_prompts"])
    cols = [i for i in range(min(FIGURE_COLUMNS, half))] + [half + i for i in range(min(FIGURE_COLUMNS, half))]
    rows, names = [], []
    for name in PIPELINES:
        for scale in CFG_SCALES:
            npz = root / f"samples-{name}-{_cfg_name(scale)}" / "samples.npz"
            if not npz.is_file():
                return None
            with np.load(npz) as f:
                images = f["images"]
            rows.append(images[[c % len(prompts) for c in cols]])
            names.append(f"{name}-{_cfg_name(scale)}")
    grid = np.concatenate(rows).repeat(upscale, axis=1).repeat(upscale, axis=2)
    save_png(root / "samples.png", image_grid(grid, None, ncols=len(cols)))
    return names


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_scenes_summary(root: str | Path, results: list[StepResult], size: str) -> str:
    """summary.json (every alignment figure, the classifier's test score, step wall times) and summary.md (tables)."""
    from digit.utils.io import atomic_write_bytes, atomic_write_json

    root = Path(root)
    rows: dict[str, Any] = {}
    for scale in CFG_SCALES:
        for name in PIPELINES:
            path = root / f"alignment-{name}-{_cfg_name(scale)}.json"
            if path.is_file():
                rows[f"{name}-{_cfg_name(scale)}"] = json.loads(path.read_text())["alignment"]
    clf = root / "classifier" / "classifier.json"
    test = json.loads(clf.read_text())["test"] if clf.is_file() else None
    walls = {r.name: round(r.wall_s, 1) for r in results}
    summary = {"size": size, "alignment": rows, "classifier_test": test, "wall_s": walls,
               "total_wall_s": round(sum(walls.values()), 1)}  # fmt: skip
    atomic_write_json(root / "summary.json", summary)
    lines = [f"# digit recipe scenes ({size})", "",
             "Fraction of generated images whose attributes (classifier) match their prompt: all attributes / "
             "layout / shape / colour / size.", "",
             "| tokens | CFG | prompts | n | all | layout | shape | colour | size |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    groups = [("seen", "seen pairs"), ("unseen", "held-out pairs")]
    for key, res in rows.items():
        name, cfg = key.split("-")
        for g, label in groups:
            r = res[g]
            lines.append(f"| {'discriminative' if name == 'digit' else 'VQ'} | {cfg[3:]} | {label} | {r['n']} | "
                         f"{_fmt(r.get('all'))} | {_fmt(r.get('layout'))} | {_fmt(r.get('shape'))} | "
                         f"{_fmt(r.get('color'))} | {_fmt(r.get('size'))} |")  # fmt: skip
    if test is not None:
        for g, label in groups:
            r = test[g]
            lines.append(f"| real renders (classifier test) | - | {label} | {r['n']} | {_fmt(r.get('all'))} | "
                         f"{_fmt(r.get('layout'))} | {_fmt(r.get('shape'))} | {_fmt(r.get('color'))} | "
                         f"{_fmt(r.get('size'))} |")  # fmt: skip
    figure = write_samples_figure(root)
    if figure is not None:
        prompts = (root / "data" / "prompts.txt").read_text(encoding="utf-8").splitlines()
        half = len(prompts) // 2
        k = min(FIGURE_COLUMNS, half)
        shown = prompts[:k] + prompts[half : half + k]
        lines += ["", f"samples.png: rows {', '.join(figure)}; columns (one sample each):"]
        lines += [f"{i + 1}. {p}{' (held-out pair)' if i >= k else ''}" for i, p in enumerate(shown)]
    lines += ["", "| step | wall time |", "|---|---|"] + [f"| {k} | {v / 60:.1f} min |" for k, v in walls.items()]
    md = "\n".join(lines) + "\n"
    atomic_write_bytes(root / "summary.md", md.encode("utf-8"))
    return md

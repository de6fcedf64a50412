"""`digit demo`: the main job end to end on the shipped CIFAR-10 reference models, with a report.

1. class-conditional samples (stage 1 on discriminative tokens -> stage-2 decoder -> VQ decoder) as a labelled grid;
2. the tokenizer at work: image -> discriminative token map -> stage-2 re-rendering from those tokens alone (and the
   VQ reconstruction beside it, for scale);
3. ``report.md`` and ``report.html`` saying what ran, with which models, how long it took, and where the files are.

When the reference models are missing, the CIFAR-10 recipe runs at its small size first (on CIFAR-10 when an archive
is given or found, otherwise on generated shapes), so a newcomer always gets a real run.
"""

from __future__ import annotations

import html
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digit.errors import DigitError
from digit.recipes.ship import MANIFEST, MODEL_PARTS
from digit.utils.io import atomic_write_bytes, read_json
from digit.utils.outputs import mark_dir

CIFAR_CANDIDATES = ("../shared/data/cifar10-train.tar.gz", "data/cifar10-train.tar.gz")


def shipped_models() -> Path:
    """Where the embedded reference models live inside the installed package."""
    return Path(str(resources.files("digit") / "assets" / "cifar10"))


def models_complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() and all((folder / p).is_dir() for p in MODEL_PARTS)


def train_fallback_models(out: Path, data: str | None, seed: int, size: str = "small", log=print) -> tuple[Path, str]:
    """Run the small recipe (training steps only) and ship its models into ``out/models``. Returns (folder, data
    description)."""
    from digit.recipes.cifar10 import RecipePlan, training_steps
    from digit.recipes.runner import run_steps
    from digit.recipes.ship import ship_models

    if data is None:
        data = next((c for c in CIFAR_CANDIDATES if Path(c).exists()), None)
    if data is None:
        from digit.data.synthetic import write_shapes_dataset

        data = str(out / "shapes")
        if not Path(data, "done").exists():
            log("no CIFAR-10 archive found (pass --data): generating 10 classes x 250 synthetic 32x32 shape images")
            write_shapes_dataset(data, n_classes=10, per_class=250, size=32, seed=seed)
            Path(data, "done").touch()
        described = f"generated shapes ({data})"
    else:
        described = str(data)
    # only the training steps of one route and seed: the claims' measurements are the full recipe's business
    plan = RecipePlan(str(Path(data).resolve()), size=size, routes=("dino",), seeds=(seed,), seed=seed)
    run_steps(training_steps(plan), out / f"recipe-{size}", log=log)
    return ship_models(out / f"recipe-{size}", out / "models", route="dino", seed=seed), described


def token_colors(centroids: np.ndarray) -> np.ndarray:
    """One RGB colour per token id: the centroids' first three principal components, scaled to [0, 255], so ids
    with similar features get similar colours."""
    c = centroids - centroids.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    p = c @ vt[:3].T
    p = (p - p.min(0)) / np.maximum(p.max(0) - p.min(0), 1e-8)
    return (p * 255).astype(np.uint8)


def _upscale(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, h, w, 3] -> [N, size, size, 3], nearest (pixels and token cells stay crisp)."""
    n, h, w, _ = images.shape
    return images.repeat(size // h, axis=1).repeat(size // w, axis=2)


def labelled_rows(rows: list[np.ndarray], labels: list[str], header: list[str] | None = None) -> np.ndarray:
    """Rows of equal-size uint8 tiles -> one image with a label column on the left (and column headers on top)."""
    from PIL import Image, ImageDraw

    tile = rows[0][0].shape[0]
    pad, label_w, head_h = 4, 84, 14 if header else 0
    ncols = max(len(r) for r in rows)
    canvas = Image.new(
        "RGB", (label_w + ncols * (tile + pad) + pad, head_h + len(rows) * (tile + pad) + pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for j, h in enumerate(header or []):
        draw.text((label_w + pad + j * (tile + pad), 2), h, fill=(0, 0, 0))
    for i, (row, label) in enumerate(zip(rows, labels)):
        y = head_h + pad + i * (tile + pad)
        draw.text((4, y + tile // 2 - 6), label, fill=(0, 0, 0))
        for j, img in enumerate(row):
            canvas.paste(Image.fromarray(img), (label_w + pad + j * (tile + pad), y))
    return np.asarray(canvas)


def _load_images(folder: Path, size: int) -> tuple[torch.Tensor, list[str]]:
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    if not files:
        raise DigitError(f"{folder} holds no demo images (*.png)")
    arrs = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in files]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
    return x, [f.stem.split("-")[0] for f in files]


def tokenizer_at_work(models: Path, pipe: Any, seed: int, scale: int = 96) -> tuple[np.ndarray, dict[str, Any]]:
    """image | token map | stage-2 re-rendering from the discriminative tokens | VQ reconstruction, one row each."""
    from digit.sampling.generate import generate
    from digit.tokenizers import load_tokenizer
    from digit.utils.images import to_uint8

    tok = load_tokenizer(models / "tokenizer", device=pipe.device)
    x, names = _load_images(models / "images", tok.image_size)
    g = torch.Generator(device=pipe.device).manual_seed(seed)
    with torch.no_grad():
        ids = tok.encode(x.to(pipe.device))  # [N, h, w]
        vq_ids = generate(pipe.decoder, cond=ids.reshape(len(x), -1), top_p=0.8, generator=g)
        rerender = to_uint8(pipe.vq.decode(vq_ids))
        recon = to_uint8(pipe.vq.decode(pipe.vq.encode(x.to(pipe.device))))
    if hasattr(pipe.decoder, "clear_cache"):
        pipe.decoder.clear_cache()
    colors = token_colors(tok.centroids.cpu().numpy())
    token_map = colors[ids.cpu().numpy()]  # [N, h, w, 3]
    originals = to_uint8(x)
    rows = [
        [_upscale(a[None], scale)[0] for a in (originals[i], token_map[i], rerender[i], recon[i])]
        for i in range(len(x))
    ]
    grid = labelled_rows(rows, names, header=["image", "token map", "stage-2 from tokens", "VQ reconstruction"])
    used = len(np.unique(ids.cpu().numpy()))
    return grid, {"images": len(x), "distinct_tokens": used, "vocab_size": tok.vocab_size, "grid": list(tok.grid_size)}


def run_demo(
    out: str | os.PathLike,
    models: str | os.PathLike | None = None,
    *,
    data: str | None = None,
    per_class: int = 8,
    cfg_scale: float = 2.0,
    top_k: int = 100,
    seed: int = 0,
    device: Any = "cpu",
    fallback_size: str = "small",
    log=print,
) -> Path:
    from digit.pipeline import generate_images, load_pipeline
    from digit.sampling.params import SamplingParams
    from digit.utils.images import save_png

    t_start = time.perf_counter()
    out = Path(out)
    mark_dir(out, "demo")
    folder = Path(models) if models is not None else shipped_models()
    trained_here = None
    if not models_complete(folder):
        if models is not None:
            raise DigitError(f"{folder} is not a demo model folder (made by `digit recipe ship`)")
        log(
            f"the shipped reference models are not in {folder} (a checkout without them, or a trimmed install):"
            " running the CIFAR-10 recipe at its small size instead (a few minutes on 2 CPU cores)"
        )
        folder, trained_here = train_fallback_models(out, data, seed, size=fallback_size, log=log)
    manifest = read_json(folder / MANIFEST)
    log(f"models: {folder}")
    pipe = load_pipeline(folder / "stage1", folder / "vq", folder / "stage2", device=device)
    names = pipe.class_names or [str(i) for i in range(pipe.num_classes)]

    t0 = time.perf_counter()
    labels = np.repeat(np.arange(pipe.num_classes), per_class)
    sampling = SamplingParams(cfg_scale=cfg_scale, top_k=top_k)
    gen = generate_images(pipe, labels, sampling, batch_size=max(len(labels), 1), seed=seed, progress=True)
    t_gen = time.perf_counter() - t0
    tiles = _upscale(gen.images, 64)
    rows = [list(tiles[labels == c]) for c in range(pipe.num_classes)]
    samples_png = save_png(out / "samples.png", labelled_rows(rows, names))

    log("the tokenizer at work: image -> token map -> stage-2 re-rendering")
    t0 = time.perf_counter()
    work, work_info = tokenizer_at_work(folder, pipe, seed)
    t_tok = time.perf_counter() - t0
    work_png = save_png(out / "tokenizer.png", work)

    info = {
        "models": str(folder),
        "trained_here": trained_here,
        "figures": manifest.get("figures"),
        "claims_md": claims_section(manifest),
        "samples": len(labels),
        "per_class": per_class,
        "sampling": {"cfg_scale": cfg_scale, "top_k": top_k, "decoder_top_p": 0.8, "seed": seed},
        "seconds": {
            "generate": round(t_gen, 1),
            "tokenizer": round(t_tok, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },  # fmt: skip
        "tokenizer": work_info,
        "files": {"samples": str(samples_png), "tokenizer": str(work_png)},
    }
    if info["claims_md"]:
        log(info["claims_md"])
    write_report(out, info)
    return out / "report.md"


def format_figures(figs: dict[str, Any]) -> str:
    """The recipe's recorded figures in words (those a small fallback run did not measure are left out)."""
    parts = []
    if figs.get("encoder_knn_top1") is not None:
        parts.append(f"encoder kNN top-1 {figs['encoder_knn_top1']:.2%}")
    if figs.get("tokenizer_knn_top1") is not None:
        parts.append(f"tokenizer-feature kNN top-1 {figs['tokenizer_knn_top1']:.2%}")
    if figs.get("vq_psnr") is not None:
        parts.append(f"VQ PSNR {figs['vq_psnr']:.2f} dB")
    fd_name = f"FD in {figs['fd_space']}" if figs.get("fd_space") else "FID-proxy"
    for key, what, fmt in (("fid", "Inception FID", ".2f"), ("fd", fd_name, ".3f"),
                           ("probe_best_top1", "best linear probe", ".2%")):  # fmt: skip
        v = figs.get(key) or {}
        if v.get("digit") is not None and v.get("vq") is not None:
            parts.append(f"{what} {v['digit']:{fmt}} (discriminative tokens) vs {v['vq']:{fmt}} (VQ tokens)")
    return "; ".join(parts) or "none recorded"


def claims_measured(rows: list[dict[str, str]] | None) -> bool:
    """A small fallback run measures no claims: its table would be all dashes."""
    return any(r.get("verdict") not in ("-", "not measured") for r in rows or [])


def claims_section(manifest: dict[str, Any]) -> str:
    """The recipe's claims table for these models (``digit recipe ship`` records it), as markdown; '' if none."""
    rows = manifest.get("claims")
    if not claims_measured(rows):
        return ""
    from digit.recipes.report import claims_markdown

    seeds = manifest.get("claims_seeds") or []
    over = f"GPT seeds {', '.join(map(str, seeds))}, mean ± std [min, max]" if len(seeds) > 1 else "one GPT seed"
    return "\n".join([
        "## The paper's claims, measured on these models' recipe",
        "",
        f"From `digit recipe cifar10` (route `{manifest.get('route', '?')}`, {over}): discriminative tokens against VQ",
        "tokens with the same GPT size, steps and batch. Verdicts follow rules stated before the run (results/cifar10.md).",
        "",
        *claims_markdown(rows),
    ])  # fmt: skip


def write_report(out: Path, info: dict[str, Any]) -> None:
    tw, s = info["tokenizer"], info["seconds"]
    origin = (
        f"trained just now by the small CIFAR-10 recipe on {info['trained_here']}"
        if info["trained_here"]
        else "the shipped CIFAR-10 reference models (see results/cifar10.md for how they were trained)"
    )
    fig_line = format_figures(info.get("figures") or {})
    claims = info.get("claims_md") or ""
    md = f"""# digit demo

Models: `{info["models"]}`, {origin}. Their recorded figures: {fig_line}.

## Class-conditional samples

![samples](samples.png)

{info["samples"]} images ({info["per_class"]} per class): a GPT samples a {tw["grid"][0]}x{tw["grid"][1]} grid of discriminative tokens for each
class label (classifier-free guidance {info["sampling"]["cfg_scale"]}, top-k {info["sampling"]["top_k"]}), the stage-2
decoder turns them into VQ tokens (top-p {info["sampling"]["decoder_top_p"]}), and the VQ decoder renders pixels.
{s["generate"]} s.

{claims}

## The tokenizer at work

![tokenizer](tokenizer.png)

Each row: a validation image; its {tw["grid"][0]}x{tw["grid"][1]} discriminative token map (one colour per token id,
coloured by the codebook's first three principal components, so similar features look alike; {tw["distinct_tokens"]}
distinct ids of {tw["vocab_size"]} in these {tw["images"]} images); the stage-2 decoder's rendering from those tokens
alone; the VQ tokenizer's own reconstruction, for scale. {s["tokenizer"]} s.

## Files

- `{info["files"]["samples"]}`
- `{info["files"]["tokenizer"]}`
- `{out / "report.html"}` (this report as HTML)

Total {s["total"]} s. Reproduce the models: `digit recipe cifar10 --data cifar10-train.tar.gz --out runs/cifar10`.
"""
    md = md.replace("\n\n\n\n", "\n\n")  # no claims section: no gap
    atomic_write_bytes(out / "report.md", md.encode())
    atomic_write_bytes(out / "report.html", markdown_page(md, beside=("Class-conditional samples", "The paper")))


def _html_lines(lines: list[str]) -> str:
    body: list[str] = []
    table: list[list[str]] = []
    for line in [*lines, ""]:
        if line.startswith("|"):
            if not set(line) <= set("|- "):  # the header's separator row carries nothing
                table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if table:
            head, *rest = table
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest]
            body.append("</table>")
            table = []
        if line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            body.append(f'<p><img src="{html.escape(src)}" alt="{html.escape(src)}"></p>')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:].replace('`', ''))}</li>")
        elif line:
            body.append(html.escape(line).replace("`", ""))
        else:
            body.append("<p>")
    return "\n".join(body)


def markdown_page(md: str, beside: tuple[str, str] = ("", "")) -> bytes:
    """The report's markdown as one HTML page; the two ``## `` sections whose titles start with ``beside`` are shown
    side by side (the samples next to the claims table)."""
    title, *rest = md.split("\n## ")
    parts = ["<!doctype html><meta charset='utf-8'><title>digit demo</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:2px 6px;font-size:13px}.beside{display:flex;gap:24px;"
             "flex-wrap:wrap;align-items:flex-start}.beside>section{flex:1 1 420px}</style>",
             f"<h1>{html.escape(title.splitlines()[0][2:])}</h1>", _html_lines(title.splitlines()[1:])]  # fmt: skip
    sections = []
    for sec in rest:
        head, *lines = sec.splitlines()
        sections.append((head, f"<section><h2>{html.escape(head)}</h2>\n{_html_lines(lines)}</section>"))
    i = 0
    while i < len(sections):
        head, block = sections[i]
        nxt = sections[i + 1] if i + 1 < len(sections) else None
        if beside[0] and head.startswith(beside[0]) and nxt and nxt[0].startswith(beside[1]):
            parts.append(f"<div class='beside'>{block}\n{nxt[1]}</div>")
            i += 2
        else:
            parts.append(block)
            i += 1
    return ("\n".join(parts) + "\n").encode()

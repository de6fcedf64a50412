"""The model card (``README.md``) `save_pretrained` writes: the Hub's YAML metadata (``huggingface_hub.ModelCardData``)
then what the pipeline is, how to use it, how it was trained (from the runs' ``config.json``), and its measured figures
when the folder it came from recorded any (``models.json`` of `digit recipe ship`). Nothing is claimed that the
configs and manifests do not hold."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from digit.pipeline import Pipeline

PIPELINE_TAG = "unconditional-image-generation"  # the Hub's task for image generators without a text prompt
TEXT_PIPELINE_TAG = "text-to-image"
KIND_TEXT = {
    "digit-ar": "DiGIT: a GPT samples discriminative tokens, an autoregressive decoder turns them into VQ tokens, "
    "a VQGAN renders them",
    "digit-nar": "DiGIT: a GPT samples discriminative tokens, a MaskGIT-style decoder turns them into VQ tokens, "
    "a VQGAN renders them",
    "llamagen": "LlamaGen-style: a GPT samples VQ tokens, a VQGAN renders them",
}
# what the figures of `digit recipe cifar10` mean (digit.recipes.report); others are listed under their own key
FIGURES = {
    "encoder_knn_top1": "SSL encoder: kNN top-1 accuracy on the held-out images",
    "tokenizer_knn_top1": "discriminative tokenizer: weighted kNN top-1 (k 20) of its mean-pooled features (what "
    "K-means quantises) on the held-out images",
    "vq_psnr": "VQ tokenizer: reconstruction PSNR (dB, training batch)",
    "fid.digit": "Inception FID of DiGIT samples against training-set statistics (lower is better)",
    "fid.vq": "Inception FID of the same GPT trained on VQ tokens (comparison run, not in this folder)",
    "fid.floor": "Inception FID floor: held-out real images against the same statistics",
    "fd.digit": "FID-proxy of DiGIT samples: Fréchet distance in a separate evaluation encoder's features (not "
    "Inception FID; the network fd_space names, else a DINO evaluation encoder; lower is better)",
    "fd.vq": "FID-proxy of the same GPT trained on VQ tokens (comparison run, not in this folder)",
    "fd.train": "FID-proxy floor: real training images against the held-out images",
    "fd.floor": "FD floor: held-out real images against the training-set statistics",
    "fd_space": "the network whose features the fd.* figures use",
    "probe_best_top1.digit": "linear probe on the stage-1 GPT's best layer: top-1 on the held-out images",
    "probe_best_top1.vq": "the same probe on the VQ-token GPT (comparison run, not in this folder)",
}
TRAIN_KEYS = ("steps", "epochs", "batch_size", "lr", "schedule", "warmup", "weight_decay", "recipe", "seed",
              "label_smoothing", "ema")  # fmt: skip


def default_license(pipe: Pipeline) -> str:
    """Weights converted from a release keep that release's licence ("other": the card names the source); weights
    trained with digit default to the project's Apache-2.0 (``save_pretrained(license=...)`` sets another)."""
    return "other" if any(_converted_from(c) for c in _configs(pipe).values()) else "apache-2.0"


def _configs(pipe: Pipeline) -> dict[str, dict[str, Any]]:
    out = {"stage 1": pipe.stage1_config}
    if pipe.decoder is not None:
        out["stage-2 decoder"] = pipe.decoder_config or {}
    return out


def _converted_from(config: dict[str, Any]) -> Any:
    return (config.get("train") or {}).get("converted_from")


def _params(model: Any) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M"


def _gpt_row(name: str, model: Any) -> str:
    c = model.config
    cond = {
        "class": f"class-conditional ({c.num_classes} classes)",
        "prefix": "conditioned on stage-1 tokens",
        "text": f"text-conditional ({c.caption_len} x {c.caption_dim} caption features)",
    }.get(c.cond, "unconditional")
    order = "autoregressive" if c.causal else "bidirectional (MaskGIT)"
    return (
        f"| {name} | GPT ({c.arch} layout), {c.n_layers} layers x {c.dim}, {c.n_heads} heads, {order}, {cond}; "
        f"{c.grid[0]}x{c.grid[1]} tokens of {c.vocab_size} | {_params(model)} |"
    )


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        elif v is not None:
            out.append((key, v))
    return out


def _training(name: str, config: dict[str, Any]) -> list[str]:
    source = _converted_from(config)
    if source:
        return [f"- **{name}**: converted from a released checkpoint: `{source}` (its licence applies)."]
    train = config.get("train") or {}
    given = ", ".join(f"{k} {train[k]}" for k in TRAIN_KEYS if train.get(k) not in (None, ""))
    meta = (config.get("data") or {}).get("meta") or {}
    data = []
    if meta.get("n_images"):
        data.append(f"{meta['n_images']:,} images" + (f" ({meta['n_rows']:,} rows with {'+'.join(meta['views'])})" if meta.get("views") else ""))  # fmt: skip
    tok = (meta.get("tokenizer") or {}).get("type")
    if tok:
        data.append(f"{tok} tokens")
    line = f"- **{name}**: " + (given or "no training settings recorded")
    return [line + (f"; data: {', '.join(data)}." if data else ".")]


def model_card(pipe: Pipeline, meta: dict[str, Any], repo_id: str | None = None) -> str:
    """The card's text; ``meta`` is the folder's ``pipeline.json`` (licence, info)."""
    from huggingface_hub import ModelCardData

    k = pipe.num_classes
    tags = ["digit", "image-generation", "autoregressive", "pytorch", pipe.kind]
    text = pipe.is_text
    tags.append("text-to-image" if text else "class-conditional-image-generation" if k else "unconditional")
    tag = TEXT_PIPELINE_TAG if text else PIPELINE_TAG
    data = ModelCardData(license=meta["license"], library_name="digit", pipeline_tag=tag, tags=tags)
    info = meta.get("info") or {}
    names = pipe.class_names
    size = pipe.image_size
    where = repo_id or "path/to/this/folder"
    pick = [repr(n) for n in names[:2]] if names else ["0", "1"]
    call = f"classes=[{', '.join(pick)}], num_images=8, seed=0" if k else "num_images=8, seed=0"
    load = f'"{where}"'
    if text:
        call = 'prompts=["a red circle", "a blue square"], num_images=8, seed=0'
        if not (meta.get("text_encoder") or {}).get("copied"):
            load += ', text_encoder="path/to/its/text-encoder"'  # not in the folder: the user supplies it
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# digit pipeline: {pipe.kind}, {size}x{size} px"
        + (", text-conditional" if text else f", {k} classes" if k else ", unconditional"),
        "",
        KIND_TEXT.get(pipe.kind, pipe.kind) + ". Written by the `digit` package (`Pipeline.save_pretrained`).",
        "",
        "## Usage",
        "",
        "```python",
        "from digit import Pipeline",
        f"pipe = Pipeline.from_pretrained({load})",
        f"images = pipe({call})  # a list of RGB PIL images",
        'images[0].save("sample.png")',
        "```",
        "",
        "Sampling parameters (`temperature`, `top_k`, `top_p`, `cfg_scale`, ...) are keyword arguments;"
        " `return_tokens=True` also returns the labels and token grids.",
        "",
    ]
    if names:
        lines += [f"Classes: {', '.join(f'{i} {n}' for i, n in enumerate(names))}.", ""]
    lines += ["## Model", "", "| part | what | parameters |", "|---|---|---|", _gpt_row("stage 1", pipe.stage1)]
    if pipe.decoder is not None:
        lines.append(_gpt_row("stage-2 decoder", pipe.decoder))
    v = pipe.vq
    lines += [
        f"| VQ decoder | VQGAN ({v.cfg.family}), codebook {v.vocab_size}, {v.grid_size[0]}x{v.grid_size[1]} codes -> "
        f"{size}x{size} px | {_params(v)} |",
        "",
        "## Training",
        "",
    ]
    for name, cfg in _configs(pipe).items():
        lines += _training(name, cfg)
    if info.get("made_by"):
        lines += ["", f"Made by: `{info['made_by']}`" + (f" (recipe size `{info['recipe_size']}`)." if info.get("recipe_size") else ".")]  # fmt: skip
    steps = info.get("steps") or []
    if steps:
        lines += ["", "<details><summary>Every step's command and wall time</summary>", "", "| step | command | wall time |", "|---|---|---|"]  # fmt: skip
        lines += [
            f"| {s.get('name')} | `{s.get('command')}` | {s.get('wall_s')} s |" for s in steps if isinstance(s, dict)
        ]
        lines += ["", "</details>"]
    lines += ["", "## Results", ""]
    figures = _flatten(info.get("figures") or {})
    if figures:
        lines += ["Measured when the models were made (one run, as recorded):", "", "| figure | value |", "|---|---|"]
        lines += [f"| {FIGURES.get(key, key)} | {value:.4g} |" if isinstance(value, float) else f"| {FIGURES.get(key, key)} | {value} |" for key, value in figures]  # fmt: skip
    else:
        lines.append("No figures were recorded for these models.")
    lines.append("")
    return "\n".join(lines)

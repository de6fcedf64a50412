"""`digit sample`: generate token grids with a trained GPT run into a token directory (same format as `digit tokenize`).

Class lists are balanced: ``--classes`` (default: every trained class) with ``--per-class K`` gives each class K
samples in class-major order; with ``-n N`` the classes are taken round-robin (counts differ by at most one).
Sampling semantics (CFG on raw logits, temperature, top-k, top-p) are documented in `digit.sampling.filters`.
One generator seeded with ``--seed`` drives every batch: the same seed and batch size give the same tokens.
"""

from __future__ import annotations

import argparse
from typing import Any

from digit.cli.common import add_device_arg, add_output_args, existing_dir
from digit.errors import DigitError

# meta keys that write_token_dir computes itself; the rest of the training meta (tokenizer config, ...) is copied
_OWN_KEYS = {
    "format",
    "format_version",
    "grid",
    "vocab_size",
    "num_classes",
    "class_names",
    "views",
    "n_images",
    "n_rows",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample token grids from a trained GPT",
        description="Sample token grids from a `digit train` run; writes tokens.npy, labels.npy, meta.json.",
    )
    p.add_argument("--run", type=existing_dir, required=True, help="run directory (config.json + model.safetensors)")
    p.add_argument("-n", "--num-samples", dest="n", type=int, default=None, help="number of samples")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class ids to sample (default: all trained)")
    p.add_argument("--per-class", type=int, default=None, help="samples per class (instead of -n)")
    p.add_argument(
        "--prefix-tokens", type=existing_dir, default=None, help="token directory of prefixes (prefix models)"
    )
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cfg-interval", type=int, default=-1, help="no guidance after this token index (-1 = always)")
    p.add_argument("--cfg-schedule", choices=("constant", "linear"), default="constant", help="guidance schedule")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    add_device_arg(p)
    add_output_args(p, "output token directory")
    p.set_defaults(func=run)


def class_list(num_classes: int, classes: list[int] | None, n: int | None, per_class: int | None) -> list[int]:
    """The balanced label list described in the module docstring."""
    classes = list(range(num_classes)) if classes is None else list(classes)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise DigitError(f"class id {bad[0]} was not trained (the model has classes 0..{num_classes - 1})")
    if per_class is not None:
        if per_class < 1:
            raise DigitError(f"--per-class must be positive, got {per_class}")
        labels = [c for c in classes for _ in range(per_class)]
        if n is not None and n != len(labels):
            raise DigitError(f"-n {n} disagrees with {len(classes)} classes x --per-class {per_class}")
        return labels
    if n is None:
        raise DigitError("give -n N or --per-class K")
    return [classes[i % len(classes)] for i in range(n)]


def _validate(args: argparse.Namespace, model_cfg: Any, model_dict: dict) -> None:
    if args.n is not None and args.n < 1:
        raise DigitError(f"-n must be positive, got {args.n}")
    if args.batch_size < 1:
        raise DigitError(f"--batch-size must be positive, got {args.batch_size}")
    if args.top_k < 0:
        raise DigitError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise DigitError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature < 0:
        raise DigitError(f"--temperature must be >= 0, got {args.temperature}")
    if args.cfg_scale != 1.0:
        if model_cfg.cond != "class":
            raise DigitError("--cfg-scale needs a class-conditional model")
        if float(model_dict.get("class_dropout", 0.0)) == 0.0:
            raise DigitError("--cfg-scale needs a model trained with class dropout (this run has class_dropout 0)")
    if model_cfg.cond != "class" and (args.classes is not None or args.per_class is not None):
        raise DigitError(f"--classes/--per-class need a class-conditional model (this one is {model_cfg.cond!r})")
    if model_cfg.cond == "prefix" and args.prefix_tokens is None:
        raise DigitError("a prefix-conditioned model needs --prefix-tokens DIR")
    if model_cfg.cond != "prefix" and args.prefix_tokens is not None:
        raise DigitError("--prefix-tokens is only for prefix-conditioned models")
    if model_cfg.cond == "none" and args.n is None:
        raise DigitError("give -n N")


def _conditions(args, model_cfg, config):
    """(cond tensor [N] / [N, P] or None, labels array [N], number of samples)."""
    import numpy as np
    import torch

    if model_cfg.cond == "class":
        labels = np.asarray(class_list(model_cfg.num_classes, args.classes, args.n, args.per_class), dtype=np.int64)
        return torch.from_numpy(labels), labels, len(labels)
    if model_cfg.cond == "prefix":
        from digit.data.tokens import check_provenance, read_token_dir

        pre = read_token_dir(args.prefix_tokens)
        check_provenance(pre, (config.get("data") or {}).get("prefix_meta"), "prefix tokenizer")
        if tuple(pre.grid) != tuple(model_cfg.prefix_grid):
            raise DigitError(f"prefix grid {pre.grid} differs from the model's {tuple(model_cfg.prefix_grid)}")
        if pre.vocab_size > model_cfg.prefix_vocab_size:
            raise DigitError(f"prefix vocabulary {pre.vocab_size} exceeds the model's {model_cfg.prefix_vocab_size}")
        n = len(pre) if args.n is None else args.n
        if n > len(pre):
            raise DigitError(f"-n {n} but {args.prefix_tokens} holds only {len(pre)} prefixes")
        prefix = torch.from_numpy(np.asarray(pre.tokens[:n], dtype=np.int64)).flatten(1)
        return prefix, np.asarray(pre.labels[:n], dtype=np.int64), n
    return None, np.full(args.n, -1, dtype=np.int64), args.n


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from digit.cli.common import resolve_device
    from digit.data.tokens import write_token_dir
    from digit.models import load_gpt_run
    from digit.sampling.generate import generate
    from digit.utils.outputs import output_dir

    out_dir = output_dir(args.out, kind="sample", inputs=(args.run, args.prefix_tokens), overwrite=args.overwrite)
    device = resolve_device(args.device)
    model, config = load_gpt_run(args.run, device=device)
    mcfg = model.config
    _validate(args, mcfg, config["model"])
    if not mcfg.causal:
        raise DigitError("this run is a bidirectional (MaskGIT) model; `digit sample` drives autoregressive runs")
    cond, labels, n = _conditions(args, mcfg, config)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    T = mcfg.seq_len
    batches = [(s, min(s + args.batch_size, n)) for s in range(0, n, args.batch_size)]
    out = np.empty((n, *mcfg.grid), dtype=np.int64)
    with tqdm(total=n * T, desc="sample", unit="tok", unit_scale=True) as bar:
        for s, e in batches:
            c = cond[s:e].to(device) if cond is not None else None
            grids = generate(
                model,
                cond=c,
                n=e - s,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                cfg_scale=args.cfg_scale,
                cfg_interval=args.cfg_interval,
                cfg_schedule=args.cfg_schedule,
                generator=gen,
                compile=args.compile,
                on_step=lambda _i, k=e - s: bar.update(k),
            )
            out[s:e] = grids.cpu().numpy()
    model.clear_cache()
    data = config.get("data") or {}
    meta = dict(data.get("meta") or {})
    sampling = {
        "run": str(args.run.resolve()),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "cfg_scale": args.cfg_scale,
        "cfg_interval": args.cfg_interval,
        "cfg_schedule": args.cfg_schedule,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "classes": sorted({int(x) for x in labels if x >= 0}),
        "prefix_tokens": str(args.prefix_tokens) if args.prefix_tokens else None,
    }
    extra = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
    extra.update(source="digit sample", sampling=sampling)
    class_names = meta.get("class_names") or []
    num_classes = mcfg.num_classes if mcfg.cond == "class" else meta.get("num_classes", len(class_names))
    write_token_dir(
        out_dir,
        out,
        labels,
        vocab_size=mcfg.vocab_size,
        class_names=class_names,
        num_classes=num_classes,
        extra_meta=extra,
    )
    print(f"wrote {n} samples ({mcfg.grid[0]}x{mcfg.grid[1]} tokens) to {args.out}")
    return 0

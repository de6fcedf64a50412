"""`digit sample`: generate token grids with a trained GPT run into a token directory (same format as `digit tokenize`).

Class lists are balanced: ``--classes`` (default: every trained class) with ``--per-class K`` gives each class K
samples in class-major order; with ``-n N`` the classes are taken round-robin (counts differ by at most one); the
listed ``--classes`` alone give one sample each (as in `digit generate`). Prompts (text-conditional runs) are spread
the same way: ``--prompt`` (repeatable) or ``--prompts FILE`` (one per line), encoded by ``--text-encoder DIR`` (the
encoder the run was trained with, checked by its hash), ``-n N`` round-robin over them (default: one each).
Sampling parameters are `digit.sampling.params.SamplingParams` (the same flags as `digit generate`); their semantics
(CFG on raw logits, temperature, top-k, top-p) are documented in `digit.sampling.filters`.
Sample ``i`` draws from its own generator seeded from (``--seed``, i): the same seed gives the same tokens whatever
the batch size. Under ``torchrun --nproc_per_node N -m digit sample --gpt-run RUN ...`` each rank samples every N-th
batch and rank 0 writes the merged output: the same tokens as one process with the same seed and settings. Spell the
run ``--gpt-run`` there: torchrun's own parser refuses ``--run`` as an ambiguous abbreviation of its ``--run-path`` /
``--run_path`` before our parser sees it (``--run`` works in a single process, and ``torchrun ... -m digit -- sample
--run RUN`` works too; every other flag of `sample` and `generate` passes through torchrun untouched).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from digit.cli.common import add_device_arg, add_output_args, add_text_encoder_args, existing_dir
from digit.errors import DigitError
from digit.sampling.params import SamplingParams
from digit.sampling.precision import add_precision_arg

# the parameters of an autoregressive model's sampling (the NAR ones belong to `digit generate`'s MaskGIT decoder)
AR_FIELDS = ("temperature", "top_k", "top_p", "cfg_scale", "cfg_interval", "cfg_schedule", "decode")

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
        description="Sample token grids from a `digit train` run; writes tokens.npy, labels.npy, meta.json. Sharded: "
        "`torchrun --nproc_per_node N -m digit sample --gpt-run RUN ...` (rank 0 writes the same output as one process; "
        "under torchrun spell the run --gpt-run: torchrun takes --run for its own --run-path).",
    )
    p.add_argument(
        "--run",
        "--gpt-run",
        dest="run",
        type=existing_dir,
        required=True,
        help="run directory (config.json + model.safetensors); --gpt-run is the spelling that works under torchrun",
    )
    p.add_argument("-n", "--num-samples", dest="n", type=int, default=None, help="number of samples")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class ids to sample (default: all trained)")
    p.add_argument("--per-class", type=int, default=None, help="samples per class (instead of -n)")
    p.add_argument(
        "--prefix-tokens", type=existing_dir, default=None, help="token directory of prefixes (prefix models)"
    )
    p.add_argument("--prompt", action="append", default=None, help="a caption to sample (text models; repeatable)")
    p.add_argument("--prompts", type=Path, default=None, help="a file of captions, one per line (text models)")
    add_text_encoder_args(p, "the text encoder the run was trained with (text models)")
    SamplingParams.add_arguments(p.add_argument_group("sampling"), only=AR_FIELDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    add_precision_arg(p)
    add_device_arg(p)
    add_output_args(p, "output token directory")
    p.set_defaults(func=run)


def class_list(num_classes: int, classes: list[int] | None, n: int | None, per_class: int | None) -> list[int]:
    """The balanced label list described in the module docstring."""
    if classes is not None and n is None and per_class is None:  # the listed classes alone: one sample each
        per_class = 1
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


def _validate(args: argparse.Namespace, params: SamplingParams, model_cfg: Any, model_dict: dict) -> None:
    if args.n is not None and args.n < 1:
        raise DigitError(f"-n must be positive, got {args.n}")
    if args.batch_size < 1:
        raise DigitError(f"--batch-size must be positive, got {args.batch_size}")
    if params.guided:
        if model_cfg.cond not in ("class", "text"):
            raise DigitError("--cfg-scale needs a class- or text-conditional model")
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
    prompts = args.prompt is not None or args.prompts is not None
    if model_cfg.cond != "text" and (prompts or args.text_encoder is not None or args.pretrained):
        raise DigitError(
            f"--prompt/--prompts/--text-encoder need a text-conditional model (this one is {model_cfg.cond!r})"
        )
    if model_cfg.cond == "text" and not (prompts and args.text_encoder is not None):
        raise DigitError("a text-conditional model needs --prompt TEXT (or --prompts FILE) and --text-encoder DIR")


def _prompt_list(args) -> list[str]:
    from digit.prompts import read_prompts, spread_prompts

    return spread_prompts(read_prompts(args.prompt, args.prompts), args.n)


def _captions(args, model_cfg, config, prompts: list[str]):
    """Encode the prompts with --text-encoder (checked against the run's encoder), left-padded as LlamaGen samples."""
    from digit.cli.common import text_encoder_dir
    from digit.prompts import encode_prompts, load_prompt_encoder

    encoder = load_prompt_encoder(text_encoder_dir(args), model_cfg, config, "--text-encoder")
    return encode_prompts(encoder, prompts, model_cfg)


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
    if model_cfg.cond == "text":
        prompts = _prompt_list(args)
        return _captions(args, model_cfg, config, prompts), np.full(len(prompts), -1, dtype=np.int64), len(prompts)
    return None, np.full(args.n, -1, dtype=np.int64), args.n


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from digit.cli.common import resolve_rank_device
    from digit.data.tokens import write_token_dir
    from digit.models import load_gpt_run
    from digit.sampling.generate import sample
    from digit.sampling.precision import cast_for_sampling
    from digit.sampling.seeds import batch_ranges, image_generators
    from digit.utils.distributed import gather_to_main, init_distributed
    from digit.utils.outputs import output_dir

    params = SamplingParams.from_args(args)  # refuses bad values before any model is loaded
    # every rank checks the output (the same verdict everywhere, so no rank waits for one that gave up)
    out_dir = output_dir(args.out, kind="sample", inputs=(args.run, args.prefix_tokens), overwrite=args.overwrite)
    dist = init_distributed()
    device = resolve_rank_device(args.device, dist.local_rank)
    model, config = load_gpt_run(args.run, device=device)
    precision = cast_for_sampling(model, args.precision)
    mcfg = model.config
    _validate(args, params, mcfg, config["model"])
    if not mcfg.causal:
        raise DigitError("this run is a bidirectional (MaskGIT) model; `digit sample` drives autoregressive runs")
    cond, labels, n = _conditions(args, mcfg, config)
    T = mcfg.seq_len
    # under torchrun, batch b goes to rank b % world: each batch is the single-process run's batch, image i keeps
    # its own generator, so the merged output is the single-process output
    mine = batch_ranges(n, args.batch_size, dist.rank, dist.world_size)
    part: list[tuple[int, np.ndarray]] = []
    passes = 0
    total = sum(e - s for s, e in mine) * T
    with tqdm(total=total, desc="sample", unit="tok", unit_scale=True, disable=not dist.is_main) as bar:
        for s, e in mine:
            c = cond[s:e].to(device) if cond is not None else None
            res = sample(
                model,
                c,
                e - s,
                params,
                generator=image_generators(args.seed, range(s, e), device),
                compile=args.compile,
                on_step=lambda _i, k=e - s: bar.update(k),
            )
            part.append((s, res.tokens.cpu().numpy()))
            passes += res.forward_passes
    model.clear_cache()
    parts = gather_to_main((part, passes))
    if not dist.is_main:
        return 0
    out = np.empty((n, *mcfg.grid), dtype=np.int64)
    for rank_part, _ in parts:
        for s, tokens in rank_part:
            out[s : s + len(tokens)] = tokens
    passes = sum(p for _, p in parts)
    data = config.get("data") or {}
    meta = dict(data.get("meta") or {})
    sampling = {
        "run": str(args.run.resolve()),
        "seed": args.seed,
        "batch_size": args.batch_size,
        **params.to_dict(),
        "precision": precision,
        "forward_passes": passes,  # model forward passes over all batches and ranks (prefill included)
        "world_size": dist.world_size,
        "classes": sorted({int(x) for x in labels if x >= 0}),
        "prefix_tokens": str(args.prefix_tokens) if args.prefix_tokens else None,
    }
    if mcfg.cond == "text":
        sampling["prompts"] = _prompt_list(args)  # sample i's caption
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

"""`digit train`: train the image GPT on a token directory (single process, or under torchrun with DDP / FSDP2).

Recipes fill the optimisation flags you do not give:
  llamagen  AdamW (0.9, 0.95), wd 0.05 on matrices, constant lr 1e-4, clip 1.0, no label smoothing (train_c2i.py)
  digit     fairseq Adam (0.9, 0.98) decoupled wd 0.01, inverse-sqrt warmup 6250 from 1e-7 to 3e-4, clip 1.0,
            label smoothing 0.1 (DiGIT stage 1; fairseq decays every tensor: add --wd-all-params for that)
"""

from __future__ import annotations

import argparse
import math

from digit.cli.common import existing_dir, non_negative_float, non_negative_int, positive_int

RECIPES = {
    "llamagen": {
        "lr": 1e-4,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
        "weight_decay": 0.05,
        "schedule": "constant",
        "warmup": 0,
        "warmup_init_lr": 0.0,
        "clip": 1.0,
        "label_smoothing": 0.0,
    },
    "digit": {
        "lr": 3e-4,
        "betas": (0.9, 0.98),
        "eps": 1e-8,
        "weight_decay": 0.01,
        "schedule": "inverse-sqrt",
        "warmup": 6250,
        "warmup_init_lr": 1e-7,
        "clip": 1.0,
        "label_smoothing": 0.1,
    },
}


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the image GPT on token grids",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--tokens", type=existing_dir, required=True, help="token directory from `digit tokenize`")
    d.add_argument(
        "--prefix-tokens",
        type=existing_dir,
        help="aligned token directory used as a prefix condition "
        "(stage-2 decoder: discriminative tokens as prefix, VQ tokens as targets)",
    )
    d.add_argument("--val-tokens", type=existing_dir, help="held-out token directory for the validation loss")
    d.add_argument("--val-prefix-tokens", type=existing_dir, help="prefix tokens aligned with --val-tokens")
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        required=True,
        help="preset: tiny, small, gpt-b, gpt-l, gpt-xl, gpt-xxl, gpt-3b, digit-base, digit-large",
    )
    m.add_argument("--dim", type=positive_int)
    m.add_argument("--layers", type=positive_int)
    m.add_argument("--heads", type=positive_int)
    m.add_argument("--arch", choices=["llama", "fairseq"], help="override the preset's layout")
    m.add_argument("--vocab-size", type=positive_int, help="default: the token directory's vocabulary")
    m.add_argument("--class-cond", action="store_true", help="condition on the token directory's class labels")
    m.add_argument("--num-classes", type=positive_int, help="default: the token directory's class count")
    m.add_argument("--class-dropout", type=non_negative_float, help="label -> null class probability (default 0.1)")
    m.add_argument("--dropout", type=non_negative_float, help="set embedding, residual and FFN dropout")
    m.add_argument("--nar", action="store_true", help="MaskGIT-style bidirectional model trained on masked tokens")
    o = p.add_argument_group("optimisation (unset flags come from --recipe)")
    o.add_argument("--recipe", choices=sorted(RECIPES), default="llamagen")
    o.add_argument("--lr", type=non_negative_float)
    o.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"))
    o.add_argument("--eps", type=non_negative_float)
    o.add_argument("--weight-decay", type=non_negative_float)
    o.add_argument("--wd-all-params", action="store_true", help="decay every tensor (fairseq), not only matrices")
    o.add_argument("--schedule", choices=["constant", "cosine", "inverse-sqrt"])
    o.add_argument("--warmup", type=non_negative_int, help="warmup steps")
    o.add_argument("--warmup-init-lr", type=non_negative_float, help="lr at step 0 of the warmup")
    o.add_argument("--min-lr-ratio", type=non_negative_float, default=0.0, help="cosine floor as a fraction of --lr")
    o.add_argument("--clip", type=non_negative_float, help="max gradient norm (0: off)")
    o.add_argument("--label-smoothing", type=non_negative_float)
    o.add_argument(
        "--ema",
        type=non_negative_float,
        default=0.0,
        help="EMA decay of the weights (0: off); model.safetensors then holds the EMA weights",
    )
    r = p.add_argument_group("run")
    length = r.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=positive_int, help="total optimizer steps (also when resuming)")
    length.add_argument("--epochs", type=non_negative_float, help="total epochs (drop-last batches)")
    r.add_argument("--batch-size", type=positive_int, default=8, help="GLOBAL batch (all ranks x accumulation)")
    r.add_argument("--grad-accum", type=positive_int, default=1)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--save-every", type=non_negative_int, default=1000, help="checkpoint period (0: only at the end)")
    r.add_argument("--eval-every", type=non_negative_int, default=0, help="validation period (needs --val-tokens)")
    r.add_argument("--log-every", type=positive_int, default=10)
    r.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default="none", help="under torchrun")
    r.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    r.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA")
    r.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    r.add_argument("--out", required=True, help="run directory")
    p.set_defaults(func=run)


def optim_settings(args: argparse.Namespace) -> dict:
    o = dict(RECIPES[args.recipe])
    for key in ("lr", "eps", "weight_decay", "schedule", "warmup", "warmup_init_lr", "clip", "label_smoothing"):
        if getattr(args, key) is not None:
            o[key] = getattr(args, key)
    if args.betas is not None:
        o["betas"] = tuple(args.betas)
    o["betas"] = list(o["betas"])
    o["min_lr_ratio"] = args.min_lr_ratio
    o["wd_all_params"] = bool(args.wd_all_params)
    o["recipe"] = args.recipe
    return o


def run(args: argparse.Namespace) -> int:
    from digit.data.tokens import read_token_dir
    from digit.errors import DigitError
    from digit.models.presets import build_config
    from digit.training import TrainConfig, Trainer
    from digit.training.gpt_task import GPTTask
    from digit.utils.distributed import init_distributed

    dist = init_distributed()
    if dist.enabled and args.parallel == "none":
        raise DigitError(f"running under torchrun with {dist.world_size} processes: pass --parallel ddp or fsdp")
    if args.val_prefix_tokens and not args.val_tokens:
        raise DigitError("--val-prefix-tokens needs --val-tokens")
    if args.eval_every and not args.val_tokens:
        raise DigitError("--eval-every needs --val-tokens")
    tokens = read_token_dir(args.tokens)
    prefix = read_token_dir(args.prefix_tokens) if args.prefix_tokens else None
    val = read_token_dir(args.val_tokens) if args.val_tokens else None
    val_prefix = read_token_dir(args.val_prefix_tokens) if args.val_prefix_tokens else None
    if prefix is not None and val is not None and val_prefix is None:
        raise DigitError("a prefix-conditioned model needs --val-prefix-tokens with --val-tokens")
    if args.class_cond and prefix is not None:
        raise DigitError("choose one condition: --class-cond or --prefix-tokens")
    overrides = {
        "dim": args.dim,
        "layers": args.layers,
        "heads": args.heads,
        "arch": args.arch,
        "vocab_size": args.vocab_size or tokens.vocab_size,
        "grid": tokens.grid,
        "causal": not args.nar,
    }
    if args.class_cond:
        n_cls = args.num_classes or tokens.num_classes
        if n_cls < 1:
            raise DigitError(f"{tokens.path} records no classes: pass --num-classes or drop --class-cond")
        overrides.update(cond="class", num_classes=n_cls, class_dropout=args.class_dropout)
    elif prefix is not None:
        overrides.update(cond="prefix", prefix_vocab_size=prefix.vocab_size, prefix_grid=prefix.grid)
    if args.dropout is not None:
        overrides.update(embed_dropout=args.dropout, resid_dropout=args.dropout, ffn_dropout=args.dropout)
    model_cfg = build_config(args.model, **overrides)

    optim = optim_settings(args)
    label_smoothing = optim.pop("label_smoothing")
    if args.epochs is not None:
        per_epoch = len(tokens) // args.batch_size
        if per_epoch == 0:
            raise DigitError(f"{len(tokens)} rows make no full batch of {args.batch_size}")
        steps = max(1, math.ceil(args.epochs * per_epoch))
    else:
        steps = args.steps
    task = GPTTask(
        model_cfg,
        tokens,
        prefix=prefix,
        val=val,
        val_prefix=val_prefix,
        optim=optim,
        label_smoothing=label_smoothing,
        total_steps=steps,
        seed=args.seed,
        eval_batch_size=max(1, args.batch_size // max(1, dist.world_size * args.grad_accum)),
    )
    cfg = TrainConfig(
        steps=steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seed=args.seed,
        ema=args.ema,
        save_every=args.save_every,
        eval_every=args.eval_every,
        log_every=args.log_every,
        parallel=args.parallel,
        compile=args.compile,
        precision=args.precision,
        num_workers=args.workers,
        progress=not args.no_progress,
    )
    if dist.is_main:
        n = sum(p.numel() for p in task.model.parameters())
        print(
            f"digit train: {args.model} ({model_cfg.arch}, {'NAR' if args.nar else 'AR'}, cond {model_cfg.cond}), "
            f"{n / 1e6:.2f}M params, {len(tokens)} rows, {steps} steps of {args.batch_size} -> {args.out}"
        )
    last = Trainer(task, cfg, args.out, resume=args.resume).fit()
    if dist.is_main and last:
        print("digit train: done, " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if "loss" in k))
    return 0

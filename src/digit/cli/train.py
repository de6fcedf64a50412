"""`digit train`: train the image GPT on a token directory (single process, or under torchrun with DDP / FSDP2).

Recipes fill the optimisation flags you do not give:
  llamagen  AdamW (0.9, 0.95), wd 0.05 on matrices, constant lr 1e-4, clip 1.0, no label smoothing (train_c2i.py)
  digit     fairseq Adam (0.9, 0.98) decoupled wd 0.01, inverse-sqrt warmup 6250 from 1e-7 to 3e-4, clip 1.0,
            label smoothing 0.1 (DiGIT stage 1; fairseq decays every tensor: add --wd-all-params for that)
"""

from __future__ import annotations

import argparse

from digit.cli.common import (
    add_text_encoder_args,
    add_trainer_args,
    existing_dir,
    non_negative_float,
    non_negative_int,
    positive_int,
    trainer_config,
)

# The published recipes live in the library (digit.training.optim.RECIPES); --help must not import torch for them.
RECIPE_NAMES = ("digit", "llamagen")


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
        help="preset: tiny, small, gpt-b, gpt-l, gpt-xl, gpt-xxl, gpt-3b, digit-base, digit-large "
        "(required unless --init-from)",
    )
    m.add_argument("--dim", type=positive_int)
    m.add_argument("--layers", type=positive_int)
    m.add_argument("--heads", type=positive_int)
    m.add_argument("--arch", choices=["llama", "fairseq"], help="override the preset's layout")
    m.add_argument("--vocab-size", type=positive_int, help="default: the token directory's vocabulary")
    m.add_argument("--class-cond", action="store_true", help="condition on the token directory's class labels")
    m.add_argument(
        "--num-classes",
        type=positive_int,
        help="default: the token directory's class count; with --init-from: grow the init model's class table to N "
        "(old rows kept, null row moved last, new rows = mean of the old ones + small seeded noise)",
    )
    m.add_argument("--class-dropout", type=non_negative_float, help="label -> null class probability (default 0.1)")
    m.add_argument(
        "--text-cond",
        action="store_true",
        help="condition on the caption features stored with --tokens (digit tokenize --captions); --class-dropout "
        "is then the caption dropout to the null caption",
    )
    add_text_encoder_args(
        m,
        "with --text-cond (or --init-from a text run): the text encoder the stored caption features must come from "
        "(its sha256 checked against theirs; the encoder itself is not run)",
    )
    m.add_argument("--dropout", type=non_negative_float, help="set embedding, residual and FFN dropout")
    m.add_argument("--nar", action="store_true", help="MaskGIT-style bidirectional model trained on masked tokens")
    f = p.add_argument_group("fine-tuning")
    f.add_argument(
        "--init-from",
        type=existing_dir,
        metavar="RUN",
        help="start from this run's weights (digit train / digit convert output): its model config, a fresh optimizer "
        "and step count; architecture flags must agree with it",
    )
    f.add_argument(
        "--freeze",
        metavar="GROUPS",
        help="comma-separated parts kept fixed: embeddings, condition, blocks, blocks:I, blocks:I-J, final_norm, head",
    )
    o = p.add_argument_group("optimisation (unset flags come from --recipe)")
    o.add_argument("--recipe", choices=RECIPE_NAMES, default="llamagen")
    o.add_argument("--lr", type=non_negative_float)
    o.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"))
    o.add_argument("--eps", type=non_negative_float)
    o.add_argument("--weight-decay", type=non_negative_float)
    o.add_argument("--wd-all-params", action="store_true", help="decay every tensor (fairseq), not only matrices")
    o.add_argument("--schedule", choices=["constant", "cosine", "inverse-sqrt"])
    o.add_argument("--warmup", type=non_negative_int, help="warmup steps")
    o.add_argument("--warmup-init-lr", type=non_negative_float, help="lr at step 0 of the warmup")
    o.add_argument("--min-lr-ratio", type=non_negative_float, help="cosine floor as a fraction of --lr (0)")
    o.add_argument("--clip", type=non_negative_float, help="max gradient norm (0: off)")
    o.add_argument("--label-smoothing", type=non_negative_float)
    add_trainer_args(p, batch_size=8)
    p.add_argument("--out", required=True, help="run directory")
    p.set_defaults(func=run)


def optimizer_config(args: argparse.Namespace):
    """The recipe with every optimisation flag given on the command line."""
    from digit.training.optim import OptimizerConfig

    return OptimizerConfig.from_recipe(
        args.recipe,
        lr=args.lr,
        betas=tuple(args.betas) if args.betas is not None else None,
        eps=args.eps,
        weight_decay=args.weight_decay,
        wd_all_params=args.wd_all_params or None,
        schedule=args.schedule,
        warmup=args.warmup,
        warmup_init_lr=args.warmup_init_lr,
        min_lr_ratio=args.min_lr_ratio,
        clip=args.clip,
        label_smoothing=args.label_smoothing,
    )


def run(args: argparse.Namespace) -> int:
    from digit.data.tokens import read_token_dir
    from digit.errors import DigitError
    from digit.training import Trainer
    from digit.training.gpt_task import GPTTask
    from digit.utils.distributed import init_distributed

    dist = init_distributed()
    cfg = trainer_config(args)
    optim = optimizer_config(args)
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
    if sum((bool(args.class_cond), prefix is not None, bool(args.text_cond))) > 1:
        raise DigitError("choose one condition: --class-cond, --prefix-tokens or --text-cond")
    model_cfg, init = _model_config(args, tokens, prefix)
    text_encoder = None
    if args.text_encoder is not None or args.pretrained:
        if model_cfg.cond != "text":
            raise DigitError(
                f"--text-encoder needs a text-conditional model (--text-cond); this one is {model_cfg.cond!r}"
            )
        from digit.cli.common import text_encoder_dir
        from digit.data.text_features import text_encoder_identity

        text_encoder = text_encoder_identity(text_encoder_dir(args), max_length=model_cfg.caption_len)

    task = GPTTask(
        model_cfg,
        tokens,
        prefix=prefix,
        val=val,
        val_prefix=val_prefix,
        optim=optim,
        seed=args.seed,
        eval_batch_size=max(1, args.batch_size // max(1, dist.world_size * args.grad_accum)),
        init=init,
        text_encoder=text_encoder,
    )
    inputs = (args.tokens, args.prefix_tokens, args.val_tokens, args.val_prefix_tokens, args.init_from)
    trainer = Trainer(
        task, cfg, args.out, resume=args.resume, inputs=inputs
    )  # the trainer counts the steps (--steps or --epochs)
    if dist.is_main:
        n = sum(p.numel() for p in task.model.parameters())
        if init is not None:
            frozen = sum(p.numel() for p in task.model.parameters() if not p.requires_grad)
            print(f"digit train: from {init.path} (sha256 {init.sha256[:12]}), {frozen / 1e6:.2f}M params frozen")
        print(
            f"digit train: {args.model or 'from init'} ({model_cfg.arch}, {'AR' if model_cfg.causal else 'NAR'}, "
            f"cond {model_cfg.cond}), "
            f"{n / 1e6:.2f}M params, {len(tokens)} rows, {trainer.total} steps of {args.batch_size} -> {args.out}"
        )
    last = trainer.fit()
    if dist.is_main and last:
        print("digit train: done, " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if "loss" in k))
    return 0


def _model_config(args: argparse.Namespace, tokens, prefix):
    """(GPTConfig, FineTune or None): from --init-from (or the fine-tuning run being resumed), else from --model."""
    from digit.errors import DigitError
    from digit.models.presets import build_config
    from digit.training.finetune import FineTuneRequest, plan

    cond = "class" if args.class_cond else "prefix" if prefix is not None else "text" if args.text_cond else None
    request = FineTuneRequest(
        init_from=args.init_from, out=args.out, resume=args.resume, seed=args.seed, preset=args.model, dim=args.dim,
        layers=args.layers, heads=args.heads, arch=args.arch, vocab_size=args.vocab_size, nar=args.nar, cond=cond,
        num_classes=args.num_classes, class_dropout=args.class_dropout, dropout=args.dropout, freeze=args.freeze,
    )  # fmt: skip
    planned = plan(request)
    if planned is not None:
        return planned
    if args.model is None:
        raise DigitError("--model is required (a preset), unless --init-from RUN gives the model")
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
    elif args.text_cond:
        from digit.data.text_features import read_caption_features

        _, length, dim = read_caption_features(tokens.path).features.shape
        overrides.update(cond="text", caption_len=length, caption_dim=dim, class_dropout=args.class_dropout)
    if args.dropout is not None:
        overrides.update(embed_dropout=args.dropout, resid_dropout=args.dropout, ffn_dropout=args.dropout)
    return build_config(args.model, **overrides), None

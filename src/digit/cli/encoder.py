"""`digit encoder pretrain`: train a timm ViT by DINO self-distillation; the output directory is an encoder directory."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from digit.cli.common import (
    add_trainer_args,
    existing_path,
    json_object,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    trainer_config,
    unit_fraction,
)
from digit.errors import DigitError


def register(subparsers) -> None:
    p = subparsers.add_parser("encoder", help="train your own self-supervised encoder (DINO)")
    sub = p.add_subparsers(dest="encoder_command", metavar="ACTION", required=True)
    q = sub.add_parser(
        "pretrain",
        help="DINO self-distillation of a timm ViT (multi-crop, EMA teacher, kNN monitor)",
        description="Train a timm ViT from scratch by DINO self-distillation (Caron et al. 2021), optionally with the "
        "DINOv2 iBOT masked-patch loss and KoLeo. --out becomes an encoder directory: pass it as --encoder DIR to "
        "`digit tokenizer fit`. Checkpoints, exact --resume and metrics.jsonl come from the shared trainer; the kNN "
        "monitor runs at the end of every epoch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    q.add_argument("--data", type=existing_path, required=True, help="image folder or .tar/.tar.gz archive")
    q.add_argument(
        "--encoder",
        required=True,
        help="timm ViT name (e.g. vit_tiny_patch16_224) or timm CNN name (e.g. tf_efficientnet_lite0: DINO on the "
        "final feature map, no iBOT)",
    )
    q.add_argument("--encoder-kwargs", type=json_object, default={}, help='JSON passed to timm, e.g. {"patch_size": 4}')
    val = q.add_mutually_exclusive_group()
    val.add_argument("--val", type=existing_path, default=None, help="labelled validation images for the kNN monitor")
    val.add_argument("--val-fraction", type=unit_fraction, default=None, help="hold out this fraction of --data")
    q.add_argument("--image-size", type=positive_int, default=None, help="global crop size (default: the encoder's)")
    q.add_argument("--local-size", type=positive_int, default=None, help="local crop size (default: 96/224 of it)")
    q.add_argument(
        "--load-size", type=positive_int, default=None, help="decode size before cropping (default: image size)"
    )
    q.add_argument("--local-crops", type=non_negative_int, default=6, help="local crops per image")
    q.add_argument("--global-scale", type=float, nargs=2, default=(0.4, 1.0), metavar=("MIN", "MAX"))
    q.add_argument("--local-scale", type=float, nargs=2, default=(0.05, 0.4), metavar=("MIN", "MAX"))
    q.add_argument("--out-dim", type=positive_int, default=65536, help="prototype count of the DINO head")
    q.add_argument("--hidden-dim", type=positive_int, default=2048, help="head MLP width")
    q.add_argument("--bottleneck-dim", type=positive_int, default=256, help="head bottleneck width")
    q.add_argument("--lr", type=positive_float, default=5e-4, help="peak lr for a batch of 256 (scaled linearly)")
    q.add_argument("--min-lr", type=non_negative_float, default=1e-6)
    q.add_argument("--warmup-epochs", type=non_negative_float, default=None, help="lr warm-up (default: 10%%, <= 10)")
    q.add_argument("--weight-decay", type=non_negative_float, default=0.04, help="start of the cosine wd schedule")
    q.add_argument("--weight-decay-end", type=non_negative_float, default=0.4)
    q.add_argument("--momentum-teacher", type=float, default=0.996, help="start of the cosine schedule to 1")
    q.add_argument("--teacher-temp", type=positive_float, default=0.07, help="teacher temperature after warm-up")
    q.add_argument("--warmup-teacher-temp", type=positive_float, default=0.04, help="teacher temperature at step 0")
    q.add_argument("--warmup-teacher-temp-epochs", type=non_negative_float, default=None, help="default: 30%%, <= 30")
    q.add_argument(
        "--freeze-last-layer-epochs",
        type=non_negative_float,
        default=None,
        help="prototypes fixed (default: 1%%, <= 1)",
    )
    q.add_argument("--clip", type=positive_float, default=3.0, help="max gradient norm")
    q.add_argument("--ibot-weight", type=non_negative_float, default=0.0, help="iBOT masked-patch loss (DINOv2: 1)")
    q.add_argument("--koleo-weight", type=non_negative_float, default=0.0, help="KoLeo regulariser (DINOv2: 0.1)")
    q.add_argument(
        "--centering",
        choices=("ema", "sinkhorn"),
        default="ema",
        help="teacher centring: ema (DINO: subtract a running batch mean) or sinkhorn (DINOv2: Sinkhorn-Knopp, "
        "every batch spread evenly over the prototypes)",
    )
    q.add_argument("--knn-k", type=positive_int, default=20)
    q.add_argument("--knn-pool", choices=("cls", "patch_mean"), default="cls", help="kNN features")
    q.add_argument("--knn-bank", type=non_negative_int, default=0, help="kNN bank size (0: all training images)")
    q.add_argument("--limit", type=non_negative_int, default=0, help="a seeded random subset of N images (0: all)")
    q.add_argument(
        "--no-cache", action="store_true", help="decode on every access (default: decode once if it fits in 4 GiB)"
    )
    d = q.add_argument_group(
        "distillation from a frozen pretrained teacher (instead of DINO; --encoder is then the student ViT)"
    )
    d.add_argument("--teacher", default=None, help="timm CNN name of the teacher, e.g. tf_efficientnet_lite0")
    d.add_argument("--teacher-weights", default="auto", help="auto (installed weights package) or a state-dict FILE")
    d.add_argument(
        "--teacher-size", type=positive_int, default=128, help="teacher input size (the images are upsampled)"
    )
    d.add_argument(
        "--teacher-layers",
        nargs=2,
        default=("stride16", "stride32"),
        metavar=("LOCAL", "GLOBAL"),
        help="per-position target map (its grid = the student's) and the map mean-pooled into the image target",
    )
    d.add_argument("--teacher-precision", choices=("fp32", "bf16"), default="bf16", help="teacher autocast (CPU)")
    d.add_argument(
        "--teacher-cache", type=Path, default=None, help="target cache directory (default: OUT/teacher_targets)"
    )
    d.add_argument(
        "--distill-weights",
        type=non_negative_float,
        nargs=3,
        default=(1.0, 1.0, 1.0),
        metavar=("LOCAL", "GLOBAL", "CONSISTENCY"),
        help="loss weights: per-position, image-level, noisy-vs-clean student features",
    )
    d.add_argument("--noise-snr", type=float, nargs=2, default=(10.0, 40.0), metavar=("MIN", "MAX"), help="dB")
    d.add_argument("--jitter", type=non_negative_float, default=0.2, help="brightness/contrast/saturation range")
    d.add_argument("--student-precision", choices=("fp32", "bf16"), default="fp32", help="student autocast (CPU)")
    add_trainer_args(q, batch_size=256, omit=("--steps", "--grad-accum", "--ema", "--eval-every"))
    q.add_argument("--out", type=Path, required=True, help="run directory = encoder directory")
    q.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    if args.teacher is not None:
        return run_distill(args)
    from digit.ssl.augment import MultiCropConfig
    from digit.ssl.dino import DINOConfig
    from digit.ssl.task import DINOTask, DINOTaskConfig
    from digit.training.trainer import Trainer
    from digit.utils.distributed import init_distributed

    dist = init_distributed()  # a no-op outside torchrun
    tcfg = trainer_config(args)
    for name, (lo, hi) in (("--global-scale", args.global_scale), ("--local-scale", args.local_scale)):
        if not 0 < lo <= hi <= 1:
            raise DigitError(f"{name} needs 0 < MIN <= MAX <= 1, got {lo} {hi}")
    if not 0 <= args.momentum_teacher < 1:
        raise DigitError(f"--momentum-teacher must be in [0, 1), got {args.momentum_teacher}")
    if (args.out / "config.json").exists() and not args.resume:
        raise DigitError(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    cfg = DINOTaskConfig(
        data=str(Path(args.data).resolve()),
        val=str(Path(args.val).resolve()) if args.val else None,
        val_fraction=args.val_fraction or 0.0,
        encoder=args.encoder,
        encoder_kwargs=args.encoder_kwargs,
        image_size=args.image_size,
        local_size=args.local_size,
        load_size=args.load_size,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay_end,
        momentum_teacher=args.momentum_teacher,
        warmup_teacher_temp_epochs=args.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=args.freeze_last_layer_epochs,
        clip=args.clip,
        crops=MultiCropConfig(
            n_local=args.local_crops, global_scale=tuple(args.global_scale), local_scale=tuple(args.local_scale)
        ),
        dino=DINOConfig(
            out_dim=args.out_dim,
            hidden_dim=args.hidden_dim,
            bottleneck_dim=args.bottleneck_dim,
            teacher_temp=args.warmup_teacher_temp,
            teacher_temp_final=args.teacher_temp,
            ibot_weight=args.ibot_weight,
            koleo_weight=args.koleo_weight,
            centering=args.centering,
        ),
        knn_k=args.knn_k,
        knn_pool=args.knn_pool,
        knn_bank=args.knn_bank,
        cache=False if args.no_cache else None,
        limit=args.limit,
    )
    task = DINOTask(cfg, workers=args.workers, quiet=args.no_progress)
    per_epoch = task.steps_per_epoch
    tcfg = replace(tcfg, eval_every=per_epoch)  # the kNN monitor: once per epoch
    main = dist.is_main
    if main:
        c = task.cfg
        print(
            f"DINO: {len(task.dataset)} training images, {per_epoch} steps/epoch x {args.epochs:g} epochs = "
            f"{task.total_steps} steps; crops 2x{c.image_size}px + {c.crops.n_local}x{c.local_size}px; "
            f"views rendered on {'the GPU' if task.render_on_device else 'CPU workers'}"
        )
        for rep in task.reports:
            print(rep.summary())
    last = Trainer(task, tcfg, args.out, resume=args.resume, inputs=(args.data, args.val)).fit()
    if main:
        summary = {k: last[k] for k in ("loss", "knn_top1", "images_per_s") if k in last}
        print(f"encoder directory: {args.out} ({json.dumps(summary)})")
        print(f"use it with: digit tokenizer fit --encoder {args.out} ...")
    return 0


def run_distill(args: argparse.Namespace) -> int:
    """`encoder pretrain --teacher NAME`: distil a frozen pretrained CNN into the --encoder ViT (digit.ssl.distill)."""
    from digit.ssl.distill import DistillConfig, DistillTask
    from digit.ssl.teacher_targets import TeacherSpec
    from digit.training.trainer import Trainer

    if args.val is not None or args.val_fraction is not None:
        raise DigitError("--val / --val-fraction (the DINO kNN monitor) are not used with --teacher")
    if (args.out / "config.json").exists() and not args.resume:
        raise DigitError(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    weights = args.teacher_weights
    if weights != "auto":
        weights = str(Path(weights).expanduser().resolve())
    cfg = DistillConfig(
        data=str(Path(args.data).resolve()),
        encoder=args.encoder,
        encoder_kwargs=args.encoder_kwargs,
        image_size=args.image_size or 32,
        teacher=TeacherSpec(
            name=args.teacher,
            weights=weights,
            image_size=args.teacher_size,
            local_layer=args.teacher_layers[0],
            global_layer=args.teacher_layers[1],
            precision=args.teacher_precision,
        ),
        teacher_cache=str(args.teacher_cache.resolve()) if args.teacher_cache else None,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay_end,
        clip=args.clip,
        local_weight=args.distill_weights[0],
        global_weight=args.distill_weights[1],
        consistency_weight=args.distill_weights[2],
        snr_db=tuple(args.noise_snr),
        jitter=args.jitter,
        limit=args.limit,
        precision=args.student_precision,
    )
    from digit.utils.outputs import claim_dir, mark_dir

    mark_dir(claim_dir(args.out, kind="run", inputs=(args.data,)), "run")  # the target cache goes inside it
    task = DistillTask(cfg, args.out, quiet=args.no_progress)
    tcfg = replace(trainer_config(args), eval_every=0)
    print(
        f"distillation: {len(task.dataset)} training images, {task.steps_per_epoch} steps/epoch x {args.epochs:g} "
        f"epochs = {task.total_steps} steps; teacher {args.teacher} at {args.teacher_size} px "
        f"(targets: {task.cfg.teacher_cache})"
    )
    last = Trainer(task, tcfg, args.out, resume=args.resume, inputs=(args.data,)).fit()
    summary = {k: round(float(last[k]), 4) for k in ("loss", "local", "global", "consistency", "images_per_s")
               if k in last}  # fmt: skip
    print(f"encoder directory: {args.out} ({json.dumps(summary)})")
    print(f"use it with: digit tokenizer fit --encoder {args.out} --layer 1 ...")
    return 0

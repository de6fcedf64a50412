"""`digit vq train` (a VQGAN through the one trainer) and `digit vq reconstruct` (PSNR / SSIM / codebook usage)."""

from __future__ import annotations

import argparse

from digit.cli.common import (
    add_device_arg,
    add_output_args,
    add_trainer_args,
    existing_dir,
    existing_path,
    non_negative_int,
    positive_int,
    trainer_config,
)

PRESET_NAMES = ["tiny", "llamagen-vq16", "mage", "taming-f16"]


def register(sub) -> None:
    p = sub.add_parser(
        "vq",
        help="train a VQGAN tokenizer or measure its reconstructions",
        description="VQGAN tokenizers (taming f16, MAGE/MaskGIT, LlamaGen VQ-16, a tiny CPU preset).",
    )
    vsub = p.add_subparsers(dest="vq_command", metavar="SUBCOMMAND", required=True)

    t = vsub.add_parser(
        "train",
        help="train a VQGAN (the output directory is also a tokenizer directory)",
        description="Reconstruction + codebook/commitment (+ entropy) losses, a PatchGAN hinge "
        "discriminator from --disc-start, LPIPS only with local --lpips-weights. Runs under torchrun "
        "(--parallel ddp|fsdp), bf16 on CUDA, exact --resume.",
    )
    t.add_argument("--data", required=True, help="image folder (ImageFolder or flat) or .tar/.tar.gz")
    t.add_argument("--preset", choices=PRESET_NAMES, default="tiny")
    t.add_argument("--image-size", type=positive_int, help="training resolution (default: the preset's)")
    t.add_argument("--codebook-size", type=positive_int, help="number of codes (default: the preset's)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--recon", choices=["l1", "l2"], default="l2", help="reconstruction loss (LlamaGen: l2)")
    t.add_argument("--entropy-weight", type=float, default=0.0, help="entropy loss ratio (0 = off)")
    t.add_argument("--disc-start", type=non_negative_int, default=20000, help="step the GAN loss switches on")
    t.add_argument("--disc-weight", type=float, default=0.5, help="generator GAN loss weight (0 = no discriminator)")
    t.add_argument("--lpips-weights", type=existing_path, help="local VGG16 + LPIPS weights (else LPIPS is off)")
    t.add_argument("--perceptual-weight", type=float, default=1.0)
    t.add_argument("--layout", choices=["auto", "imagefolder", "flat"], default="auto")
    add_trainer_args(t, batch_size=16)
    add_device_arg(t)
    t.add_argument("--out", required=True, help="run directory (config.json, model.safetensors, tokenizer.json, ...)")
    t.set_defaults(func=run_train)

    r = vsub.add_parser("reconstruct", help="reconstruct images: PSNR, SSIM, codebook usage, side-by-side grid")
    r.add_argument("--vq", type=existing_dir, required=True, help="VQ tokenizer directory")
    r.add_argument("--data", required=True, help="image folder or .tar/.tar.gz")
    r.add_argument("--layout", choices=["auto", "imagefolder", "flat"], default="auto")
    r.add_argument(
        "--limit",
        type=positive_int,
        help="N images spread evenly over the source (every (count/N)-th: each class of a class-sorted folder keeps its share)",
    )
    r.add_argument("--batch-size", type=positive_int, default=32)
    r.add_argument("--grid", type=positive_int, default=16, help="image pairs shown in grid.png")
    add_device_arg(r)
    add_output_args(r, "output directory (metrics.json, grid.png)")
    r.set_defaults(func=run_reconstruct)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from digit.cli.common import resolve_device
    from digit.data.datasets import ImageDataset, require_usable_image
    from digit.data.sources import open_image_source
    from digit.tokenizers.vq import VQModel, build_vq_config
    from digit.tokenizers.vq_train import VQLossConfig, VQTask, lpips_or_warn
    from digit.training.trainer import Trainer
    from digit.utils.distributed import init_distributed

    dist = init_distributed()
    tcfg = trainer_config(args)
    device = None
    if args.device is not None:
        device = resolve_device(args.device)
    elif torch.cuda.is_available():
        device = torch.device(f"cuda:{dist.local_rank}")
    overrides = {}
    if args.image_size:
        overrides["image_size"] = args.image_size
    if args.codebook_size:
        overrides["codebook_size"] = args.codebook_size
    if args.entropy_weight:
        overrides["entropy_loss_ratio"] = args.entropy_weight
    cfg = build_vq_config(args.preset, **overrides)
    torch.manual_seed(args.seed)  # identical init on every rank
    vq = VQModel(cfg)
    source = open_image_source(args.data, args.layout)
    require_usable_image(source)  # refuse before the run directory is written
    dataset = ImageDataset(source, cfg.image_size, train=True, seed=args.seed)
    n_eval = min(len(source), 64)
    eval_ds = ImageDataset(source, cfg.image_size, train=False, seed=args.seed)
    eval_items = [eval_ds[i][0] for i in range(n_eval)]
    eval_images = (
        torch.stack([x for x in eval_items if x is not None]) if any(x is not None for x in eval_items) else None
    )
    # PatchGAN with 3 stride-2 layers needs >= 32 px; fewer layers below that
    disc_layers = 3 if cfg.image_size >= 32 else max(1, cfg.image_size.bit_length() - 3)
    loss = VQLossConfig(
        recon=args.recon,
        disc_start=args.disc_start,
        disc_weight=args.disc_weight,
        lr=args.lr,
        perceptual_weight=args.perceptual_weight,
        disc_layers=disc_layers,
    )
    lpips = lpips_or_warn(args.lpips_weights) if args.perceptual_weight > 0 else None
    data_cfg = {
        "path": str(source.path),
        "n_images": len(source),
        "image_size": cfg.image_size,
        "lpips_weights": str(args.lpips_weights) if args.lpips_weights else None,
    }
    task = VQTask(vq, dataset, loss, lpips=lpips, data_config=data_cfg, eval_images=eval_images)
    if dist.is_main:
        n_params = sum(p.numel() for p in vq.parameters())
        print(
            f"VQ {args.preset}: {n_params / 1e6:.2f}M params, {cfg.codebook_size} codes, grid {cfg.grid_size}; "
            f"data {source.describe()}"
        )
    inputs = (args.data, args.lpips_weights)
    last = Trainer(task, tcfg, args.out, resume=args.resume, device=device, inputs=inputs).fit()
    if dist.is_main:
        shown = {
            k: round(v, 4)
            for k, v in last.items()
            if k in ("generator_rec_loss", "generator_psnr", "val_psnr", "generator_perplexity", "generator_dead_codes")
        }
        print(task.skipped.summary())
        print(f"wrote {args.out} {shown}")
    return 0


def run_reconstruct(args: argparse.Namespace) -> int:
    from pathlib import Path

    from digit.cli.common import resolve_device
    from digit.data.sources import open_image_source
    from digit.tokenizers.reconstruct import reconstruct
    from digit.tokenizers.vq import VQModel
    from digit.utils.images import save_png
    from digit.utils.io import atomic_write_json
    from digit.utils.outputs import output_dir

    target = output_dir(args.out, kind="vq reconstruct", inputs=(args.vq, args.data), overwrite=args.overwrite)
    device = resolve_device(args.device)
    vq = VQModel.load(args.vq, device=device)
    source = open_image_source(args.data, args.layout)
    res = reconstruct(vq, source, batch_size=args.batch_size, limit=args.limit, keep=args.grid)
    out = target.begin()
    m = {**res.metrics, "vq": str(Path(args.vq).resolve()), "data": str(source.path)}
    save_png(out / "grid.png", res.side_by_side())
    atomic_write_json(out / "metrics.json", m)
    out = target.publish(out)
    print(
        f"PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}  codebook usage {m['codes_used']}/{m['codebook_size']} "
        f"({100 * m['codebook_usage']:.1f}%), perplexity {m['codebook_perplexity']:.1f}  on {m['n_images']} images"
    )
    print(res.skipped.summary())
    print(f"wrote {out / 'metrics.json'} and {out / 'grid.png'}")
    return 0

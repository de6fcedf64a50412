"""`digit vq train` (a VQGAN through the one trainer) and `digit vq reconstruct` (PSNR / SSIM / codebook usage)."""

from __future__ import annotations

import argparse

from digit.cli.common import add_device_arg, existing_dir, existing_path, non_negative_int, positive_int

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
    t.add_argument("--steps", type=positive_int, help="optimizer steps")
    t.add_argument("--epochs", type=float, help="epochs (instead of --steps)")
    t.add_argument("--batch-size", type=positive_int, default=16, help="global batch size")
    t.add_argument("--grad-accum", type=positive_int, default=1)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--recon", choices=["l1", "l2"], default="l2", help="reconstruction loss (LlamaGen: l2)")
    t.add_argument("--entropy-weight", type=float, default=0.0, help="entropy loss ratio (0 = off)")
    t.add_argument("--disc-start", type=non_negative_int, default=20000, help="step the GAN loss switches on")
    t.add_argument("--disc-weight", type=float, default=0.5, help="generator GAN loss weight (0 = no discriminator)")
    t.add_argument("--lpips-weights", type=existing_path, help="local VGG16 + LPIPS weights (else LPIPS is off)")
    t.add_argument("--perceptual-weight", type=float, default=1.0)
    t.add_argument("--ema", type=float, default=0.0, help="EMA decay of the exported weights (0 = off)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layout", choices=["auto", "imagefolder", "flat"], default="auto")
    t.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default="none")
    t.add_argument("--save-every", type=non_negative_int, default=0)
    t.add_argument("--eval-every", type=non_negative_int, default=0)
    t.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_device_arg(t)
    t.add_argument("--out", required=True, help="run directory (config.json, model.safetensors, tokenizer.json, ...)")
    t.set_defaults(func=run_train)

    r = vsub.add_parser("reconstruct", help="reconstruct images: PSNR, SSIM, codebook usage, side-by-side grid")
    r.add_argument("--vq", type=existing_dir, required=True, help="VQ tokenizer directory")
    r.add_argument("--data", required=True, help="image folder or .tar/.tar.gz")
    r.add_argument("--layout", choices=["auto", "imagefolder", "flat"], default="auto")
    r.add_argument("--limit", type=positive_int, help="only the first N images")
    r.add_argument("--batch-size", type=positive_int, default=32)
    r.add_argument("--grid", type=positive_int, default=16, help="image pairs shown in grid.png")
    add_device_arg(r)
    r.add_argument("--out", required=True, help="output directory (metrics.json, grid.png)")
    r.set_defaults(func=run_reconstruct)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from digit.cli.common import resolve_device
    from digit.data.datasets import ImageDataset
    from digit.data.sources import open_image_source
    from digit.errors import DigitError
    from digit.tokenizers.vq import VQModel, build_vq_config
    from digit.tokenizers.vq_train import VQLossConfig, VQTask, lpips_or_warn
    from digit.training.trainer import TrainConfig, Trainer
    from digit.utils.distributed import init_distributed

    if (args.steps is None) == (args.epochs is None):
        raise DigitError("give exactly one of --steps or --epochs")
    dist = init_distributed()
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
    tcfg = TrainConfig(
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seed=args.seed,
        ema=args.ema,
        save_every=args.save_every,
        eval_every=args.eval_every,
        parallel=args.parallel,
        num_workers=args.workers,
    )
    if dist.is_main:
        n_params = sum(p.numel() for p in vq.parameters())
        print(
            f"VQ {args.preset}: {n_params / 1e6:.2f}M params, {cfg.codebook_size} codes, grid {cfg.grid_size}; "
            f"data {source.describe()}"
        )
    last = Trainer(task, tcfg, args.out, resume=args.resume, device=device).fit()
    if dist.is_main:
        shown = {
            k: round(v, 4)
            for k, v in last.items()
            if k in ("generator_rec_loss", "generator_psnr", "val_psnr", "generator_perplexity", "generator_dead_codes")
        }
        print(f"wrote {args.out} {shown}")
    if dist.enabled:
        torch.distributed.destroy_process_group()
    return 0


def reconstruct(vq, source, *, batch_size: int = 32, limit: int | None = None, keep: int = 16) -> dict:
    """Reconstruct ``source`` through ``vq``: metrics plus the first ``keep`` (original, reconstruction) uint8 pairs."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from digit.data.datasets import ImageDataset, SkipReport, image_loader
    from digit.pipeline import to_uint8
    from digit.tokenizers.vq_train import codebook_stats, psnr, ssim

    ds = ImageDataset(source, vq.image_size, train=False)
    if limit is not None and limit < len(ds):
        ds = torch.utils.data.Subset(ds, range(limit))
    psnrs, ssims, ids, pairs = [], [], [], []
    skipped = SkipReport(source)
    with torch.no_grad():
        for batch in tqdm(image_loader(ds, batch_size), desc="reconstruct", unit="batch"):
            skipped.add(batch["failures"])
            if not len(batch["images"]):
                continue
            x = vq.normalize(batch["images"])
            q = vq.quantize_latents(x.to(vq.quantize.embedding.weight.dtype))
            rec = vq.to_unit(vq.decode_latents(q.z_q))
            orig = vq.to_unit(x)
            psnrs.append(psnr(orig, rec).cpu())
            ssims.append(ssim(orig, rec).cpu())
            ids.append(q.ids.reshape(-1).cpu())
            if sum(len(p[0]) for p in pairs) < keep:
                pairs.append((to_uint8(orig), to_uint8(rec)))
    if not psnrs:
        from digit.errors import DigitError

        raise DigitError("no decodable images to reconstruct")
    all_ids = torch.cat(ids)
    stats = codebook_stats(all_ids, vq.vocab_size)
    metrics = {
        "n_images": int(sum(len(p) for p in psnrs)),
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "codebook_perplexity": stats["perplexity"],
        "codebook_usage": stats["usage"],
        "codes_used": int((torch.bincount(all_ids, minlength=vq.vocab_size) > 0).sum()),
        "codebook_size": vq.vocab_size,
        "skipped": len(skipped),
    }
    orig = np.concatenate([p[0] for p in pairs])[:keep]
    rec = np.concatenate([p[1] for p in pairs])[:keep]
    return {"metrics": metrics, "originals": orig, "reconstructions": rec}


def run_reconstruct(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from digit.cli.common import resolve_device
    from digit.data.sources import open_image_source
    from digit.pipeline import image_grid, save_png
    from digit.tokenizers.vq import VQModel
    from digit.utils.io import atomic_write_json

    device = resolve_device(args.device)
    vq = VQModel.load(args.vq, device=device)
    source = open_image_source(args.data, args.layout)
    res = reconstruct(vq, source, batch_size=args.batch_size, limit=args.limit, keep=args.grid)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = {**res["metrics"], "vq": str(Path(args.vq).resolve()), "data": str(source.path)}
    # side by side: original | reconstruction, pair after pair
    pairs = np.stack([res["originals"], res["reconstructions"]], axis=1).reshape(-1, *res["originals"].shape[1:])
    ncols = 2 * max(1, min(4, len(res["originals"])))
    save_png(out / "grid.png", image_grid(pairs, ncols=ncols))
    atomic_write_json(out / "metrics.json", m)
    print(
        f"PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}  codebook usage {m['codes_used']}/{m['codebook_size']} "
        f"({100 * m['codebook_usage']:.1f}%), perplexity {m['codebook_perplexity']:.1f}  on {m['n_images']} images"
    )
    print(f"wrote {out / 'metrics.json'} and {out / 'grid.png'}")
    return 0

"""Tokenization throughput: `digit tokenize`'s batched pipeline vs a one-image-at-a-time loop over the whole encoder.

The loop is how DiGIT's feature dump works (batch 1, every block run). Ours batches, runs inference_mode, stops at the
block it needs, and decodes in DataLoader workers. Also prints achieved GFLOP/s (FLOPs counted by
torch.utils.flop_counter) against this machine's measured fp32 matmul GFLOP/s, and the K-means fit's peak RSS.

    python benchmarks/tokenize.py                      # ViT-S/14-shaped encoder at 224, generated JPEGs
    python benchmarks/tokenize.py --data ../shared/data/cifar10-train.tar.gz --images 512
"""

# ruff: noqa: E402
from __future__ import annotations

import os
import sys

# This file is named tokenize.py: drop its folder from sys.path so it cannot shadow the stdlib module.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from digit.data.datasets import ImageDataset
from digit.data.sources import open_image_source
from digit.tokenizers.apply import tokenize_to_dir
from digit.tokenizers.discriminative import DiscriminativeTokenizer, nearest_centroid
from digit.tokenizers.encoder import build_encoder
from digit.tokenizers.fit import fit_tokenizer

warnings.filterwarnings("ignore", message="RANDOM-INIT")


def matmul_gflops(n: int = 2048, reps: int = 10, device: str = "cpu") -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def forward_flops(fn, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc:
        fn(x)
    return fc.get_total_flops()


def make_images(root: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((size, size), Image.BICUBIC).save(d / f"{i:05d}.jpg", quality=90)
    return root


def loop_baseline(tok: DiscriminativeTokenizer, source, n: int) -> float:
    """DiGIT-style dump: one image at a time, the whole encoder, then the codebook lookup."""
    ds = ImageDataset(source, tok.image_size)
    model = tok.encoder.model
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            img = ds[i][0]
            x = tok.normalize(img[None])
            feats = model.norm(_all_blocks(model, x))
            patches = feats[:, model.num_prefix_tokens :].reshape(-1, tok.dim)
            nearest_centroid(patches, tok.centroids, tok.c_sqnorm)
    return n / (time.perf_counter() - t)


def _all_blocks(model, x):
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks:
        h = blk(h)
    return h


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="vit_small_patch14_reg4_dinov2")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--loop-images", type=int, default=64, help="images timed in the batch-1 loop")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--clusters", type=int, default=256)
    p.add_argument("--data", help="image folder/archive (default: generated JPEGs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16-autocast run")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="digit-bench-"))
    data = Path(args.data) if args.data else make_images(tmp / "images", args.images)
    source = open_image_source(data)
    enc = build_encoder(args.encoder, random_init=True, image_size=args.image_size, layer=args.layer).to(args.device)
    print(
        f"encoder {args.encoder} @ {args.image_size}, layer {args.layer} (block {enc.block_index} of {enc.depth}), "
        f"device {args.device}, torch threads {torch.get_num_threads()}, {len(source)} images available"
    )

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    tok, report = fit_tokenizer(
        enc,
        source,
        clusters=args.clusters,
        sample_frac=0.25,
        niter=10,
        batch_size=args.batch_size,
        workers=args.workers,
        limit=args.images,
        progress=False,
    )
    fit_s = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"fit: K={args.clusters} on {report.n_features_used} features from {report.n_images} images in {fit_s:.1f} s; "
        f"peak RSS {rss1 / 1024:.0f} MiB (grew {max(rss1 - rss0, 0) / 1024:.0f} MiB during the fit)"
    )

    n = min(args.images, len(source))

    def run_pipeline(precision: str) -> float:
        enc.set_precision(precision)
        t = time.perf_counter()
        tokenize_to_dir(
            tok,
            source,
            tmp / f"tokens-{precision}",
            batch_size=args.batch_size,
            workers=args.workers,
            limit=n,
            progress=False,
        )
        return n / (time.perf_counter() - t)

    ours = run_pipeline("fp32")
    ours_bf16 = run_pipeline("bf16") if args.bf16 else None
    enc.set_precision("fp32")
    loop_n = min(args.loop_images, n)
    base = loop_baseline(tok, source, loop_n)
    if ours_bf16 is not None:
        a = np.load(tmp / "tokens-fp32" / "tokens.npy")
        b = np.load(tmp / "tokens-bf16" / "tokens.npy")
        agree = float((a == b).mean())

    x1 = torch.zeros(1, 3, args.image_size, args.image_size, device=args.device)
    flops_ours = forward_flops(lambda x: enc(x), x1)
    flops_full = forward_flops(lambda x: _all_blocks(enc.model, x), x1)
    peak = matmul_gflops(device=args.device)

    print()
    print(f"{'pipeline':<40}{'img/s':>9}{'GFLOP/img':>11}{'GFLOP/s':>9}{'% of fp32 matmul':>18}{'vs loop':>9}")
    rows = [(f"digit tokenize, fp32 (batch {args.batch_size})", ours, flops_ours)]
    if ours_bf16 is not None:
        rows.append((f"digit tokenize, bf16 autocast (batch {args.batch_size})", ours_bf16, flops_ours))
    rows.append(("batch-1 loop, whole encoder, fp32", base, flops_full))
    for name, ips, fl in rows:
        gfs = ips * fl / 1e9
        print(f"{name:<40}{ips:>9.2f}{fl / 1e9:>11.2f}{gfs:>9.1f}{100 * gfs / peak:>17.1f}%{ips / base:>8.2f}x")
    print(f"\nfp32 matmul peak measured here: {peak:.1f} GFLOP/s")
    if ours_bf16 is not None:
        print(f"bf16 ids equal to fp32 ids at {100 * agree:.2f}% of positions")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`digit eval`: FID / IS / KID / precision-recall (torch-fidelity) or FD in an encoder's space, with provenance.

digit eval --gen DIR|NPZ --ref DIR|NPZ|STATS [--metrics fid,is,prc,kid] [--features inception|DIR|NAME] [--out FILE.json]
digit eval stats --ref DIR|NPZ|TAR --out STATS.npz [--features inception|DIR|NAME]   # precompute reference statistics
"""

from __future__ import annotations

import argparse
import json
import sys

from digit.cli.common import add_device_arg, non_negative_int, positive_int
from digit.errors import DigitError

DEFAULT_MIN_IMAGES = 10000  # FID is strongly biased below ~10k samples (Chong & Forsyth 2020); protocols ask 50k


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--features",
        default="inception",
        metavar="inception|DIR|NAME",
        help="feature space: torch-fidelity's InceptionV3 (default), a tokenizer/encoder directory, or a packaged "
        "encoder NAME from `digit weights` (e.g. tf_efficientnet_lite1: last feature map at 128 px) "
        "(Fréchet distance of mean-pooled patch features; 'fd_dinov2' for a DINOv2 encoder)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="FILE",
        help="InceptionV3 weights (torch-fidelity's .pth, or .safetensors); default: the torch hub cache",
    )
    p.add_argument("--download", action="store_true", help="download the Inception weights if not cached")
    p.add_argument(
        "--inception-layer",
        default="2048",
        choices=["64", "192", "768", "2048"],
        help="Inception feature layer for FID/KID/PRC (2048 = pool3, the standard; as pytorch-fid --dims)",
    )
    p.add_argument(
        "--protocol",
        default=None,
        choices=["digit-mage", "adm-ref"],
        help="named protocol: digit-mage = ImageNet val Resize(256)+CenterCrop(256), 50k; "
        "adm-ref = ADM's VIRTUAL_imagenet256_labeled.npz statistics, 50k",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="resize (shorter side) + center crop reference images to this size",
    )
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--workers", type=non_negative_int, default=0, help="data loader workers")
    add_device_arg(p)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="generation metrics (FID/IS/KID/PRC) with provenance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gen", default=None, help="generated images: folder, samples.npz, or a generation directory")
    p.add_argument("--ref", default=None, help="reference: image folder, images .npz, .tar(.gz), or statistics .npz")
    p.add_argument("--metrics", default="fid", help="comma-separated subset of fid,is,kid,prc (default: fid)")
    p.add_argument(
        "--min-images",
        type=positive_int,
        default=DEFAULT_MIN_IMAGES,
        help=f"refuse sets smaller than this (default {DEFAULT_MIN_IMAGES}; protocols raise it)",
    )
    p.add_argument("--force", action="store_true", help="compute despite too few images / differing resolution")
    p.add_argument("--isc-splits", type=positive_int, default=10)
    p.add_argument("--kid-subsets", type=positive_int, default=100)
    p.add_argument("--kid-subset-size", type=positive_int, default=1000)
    p.add_argument("--prc-neighborhood", type=positive_int, default=3)
    p.add_argument("--seed", type=non_negative_int, default=2020, help="seed of IS splits / KID subsets")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the result (metrics + provenance) here")
    _add_common(p)
    p.set_defaults(func=run_eval)

    sub = p.add_subparsers(dest="eval_command", metavar="stats", required=False)
    s = sub.add_parser(
        "stats",
        help="compute and cache reference statistics (.npz)",
        description="Compute mu/sigma (+ hashes and provenance) of a reference set and save them.",
    )
    s.add_argument("--ref", required=True, help="reference images: folder, images .npz, or .tar(.gz)")
    s.add_argument("--out", required=True, metavar="STATS.npz")
    s.add_argument("--keep-features", action="store_true", help="also store the features (needed for KID/PRC)")
    _add_common(s)
    s.set_defaults(func=run_stats)


def _extractor(args: argparse.Namespace, logits: bool = False):
    from digit.cli.common import resolve_device
    from digit.evaluation.features import build_extractor

    device = resolve_device(args.device)
    return build_extractor(
        args.features,
        device,
        args.inception_weights,
        allow_download=args.download,
        inception_layer=args.inception_layer,
        logits=logits,
    )


def run_eval(args: argparse.Namespace) -> int:
    from digit.evaluation.fid import evaluate, parse_metrics
    from digit.utils.io import atomic_write_json

    metrics = parse_metrics(args.metrics)
    if args.gen is None or (args.ref is None and metrics != ["is"]):
        raise DigitError("--gen and --ref are required (only --metrics is needs no --ref; or use `digit eval stats`)")
    if args.features != "inception" and "is" in metrics:
        raise DigitError("the inception score needs --features inception")
    result = evaluate(
        args.gen,
        args.ref,
        lambda: _extractor(args, logits="is" in metrics),
        metrics,
        protocol=args.protocol,
        image_size=args.image_size,
        min_images=args.min_images,
        force=args.force,
        batch_size=args.batch_size,
        workers=args.workers,
        isc_splits=args.isc_splits,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        prc_neighborhood=args.prc_neighborhood,
        seed=args.seed,
    )
    if args.out:
        atomic_write_json(args.out, result)
    summary = {k: v for k, v in result.items() if k != "provenance"}
    if result["provenance"]["problems"]:
        summary["forced"] = result["provenance"]["problems"]
    print(json.dumps(summary))
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from digit.evaluation.fid import reference_stats
    from digit.evaluation.images import get_protocol

    if not str(args.out).endswith(".npz"):
        raise DigitError(f"--out must end in .npz: {args.out}")
    proto = get_protocol(args.protocol)
    size = args.image_size if args.image_size is not None else (proto.image_size if proto else None)
    stats = reference_stats(
        args.ref,
        _extractor(args),
        image_size=size,
        protocol=args.protocol,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    if proto is not None and stats.count < proto.min_images:
        print(
            f"digit eval stats: warning: {stats.count} images, protocol {proto.name} expects {proto.min_images}",
            file=sys.stderr,
        )
    stats.save(Path(args.out), keep_features=args.keep_features)
    print(
        json.dumps(
            {
                "out": str(args.out),
                "count": stats.count,
                "dim": int(len(stats.mu)),
                "stats_sha256": stats.sha256,
                "resolution": stats.meta["resolution"],
            }
        )
    )
    return 0

"""`digit tokenize`: an image collection -> a token directory (tokens.npy, labels.npy, meta.json)."""

from __future__ import annotations

import argparse

from digit.cli.common import (
    add_device_arg,
    add_output_args,
    add_text_encoder_args,
    existing_dir,
    non_negative_int,
    positive_int,
)


def register(sub) -> None:
    p = sub.add_parser(
        "tokenize",
        help="turn images into token grids with a tokenizer directory",
        description="Tokenize a folder or archive of images into a token directory. Under torchrun, "
        "each rank tokenizes its shard and rank 0 merges.",
    )
    p.add_argument("--tokenizer", type=existing_dir, required=True, help="tokenizer directory (discriminative or VQ)")
    p.add_argument("--data", required=True, help="image folder (ImageFolder or flat) or .tar/.tar.gz")
    p.add_argument("--layout", choices=["auto", "imagefolder", "flat"], default="auto")
    p.add_argument("--flip", action="store_true", help="add the tokens of horizontally flipped images as a second view")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader decoding workers (default 2)")
    p.add_argument(
        "--limit",
        type=positive_int,
        help="N images spread evenly over the source (every (count/N)-th: each class of a class-sorted folder keeps its share)",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first undecodable file")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="encoder precision: auto = bf16 on CUDA, fp32 on CPU (bf16 on CPU is faster, ids may flip at ties)",
    )
    p.add_argument(
        "--captions",
        action="store_true",
        help="also store caption features (a .txt beside each image, a metadata.jsonl, or name.jpg + name.txt in a "
        "tar); images without a caption are skipped and counted",
    )
    add_text_encoder_args(p, "the T5 encoder of the captions (with --captions)")
    p.add_argument("--text-length", type=positive_int, default=120, help="caption length in T5 tokens (default 120)")
    p.add_argument("--text-dtype", choices=["float16", "float32"], default="float16", help="stored feature dtype")
    add_device_arg(p)
    add_output_args(p, "output token directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from digit.cli.common import resolve_device, text_encoder_dir
    from digit.data.captions import with_captions
    from digit.data.sources import open_image_source
    from digit.data.text_features import CaptionTask, load_text_encoder
    from digit.errors import DigitError
    from digit.tokenizers import load_tokenizer
    from digit.tokenizers.apply import tokenize_to_dir
    from digit.utils.distributed import init_distributed
    from digit.utils.outputs import output_dir

    if args.captions != (args.text_encoder is not None):
        raise DigitError("--captions and --text-encoder DIR go together")
    text_encoder = text_encoder_dir(args)
    out = output_dir(args.out, kind="tokenize", inputs=(args.data, args.tokenizer), overwrite=args.overwrite)
    dist = init_distributed()
    device = (
        resolve_device(args.device)
        if args.device or not torch.cuda.is_available()
        else torch.device(f"cuda:{dist.local_rank}")
    )
    source = open_image_source(args.data, args.layout)
    captions = None
    if args.captions:
        source, texts = with_captions(source)
        encoder = load_text_encoder(text_encoder, max_length=args.text_length, device=str(device))
        captions = CaptionTask(texts, encoder, batch_size=args.batch_size, dtype=args.text_dtype, progress=dist.is_main)
    tok = load_tokenizer(args.tokenizer, device=device)
    if hasattr(tok, "set_precision"):
        tok.set_precision(args.precision)
    elif args.precision != "auto":
        raise DigitError("--precision applies to discriminative tokenizers")
    if dist.is_main:
        print(
            f"source: {source.describe()}; tokenizer K={tok.vocab_size} grid {tok.grid_size} ({dist.world_size} process(es))"
        )
    report = tokenize_to_dir(
        tok,
        source,
        out,
        batch_size=args.batch_size,
        workers=args.workers,
        flip=args.flip,
        strict=args.strict,
        limit=args.limit,
        captions=captions,
        extra_meta={"tokenizer_dir": str(args.tokenizer.resolve()), "precision": args.precision},
    )
    if dist.is_main and report is not None:
        print(report.summary())
        print(f"wrote {args.out}")
    return 0

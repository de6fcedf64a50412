"""`digit stability`: token change rate and code-vector cosine under Gaussian pixel noise at several SNRs."""

from __future__ import annotations

import argparse

from digit.cli.common import add_device_arg, existing_dir, non_negative_int, positive_int


def register(sub) -> None:
    p = sub.add_parser("stability", help="measure token stability under pixel noise (the paper's stability table)")
    p.add_argument("--tokenizer", type=existing_dir, required=True, help="tokenizer directory (any type)")
    p.add_argument("--data", required=True, help="image folder or .tar/.tar.gz")
    p.add_argument("--layout", choices=["auto", "imagefolder", "flat"], default="auto")
    p.add_argument("--snr", type=float, nargs="+", default=[30, 25, 20, 15, 10, 5], help="SNRs in dB (default 30..5)")
    p.add_argument(
        "--limit",
        type=positive_int,
        help="N images spread evenly over the source (every (count/N)-th: each class of a class-sorted folder keeps its share)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument(
        "--noise-space",
        choices=["input", "pixel"],
        default="input",
        help="where the noise goes: input = the tokenizer's normalised input, power measured there (default); "
        "pixel = the [0, 1] image before normalisation, so different tokenizers see the same noisy images",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="encoder precision: auto = bf16 on CUDA, fp32 on CPU (bf16 on CPU is faster, ids may flip at ties)",
    )
    add_device_arg(p)
    p.add_argument("--out", help="write the result JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import Subset

    from digit.cli.common import resolve_device
    from digit.data.datasets import ImageDataset, SkipReport, image_loader, spread_indices
    from digit.data.sources import open_image_source
    from digit.errors import DigitError
    from digit.evaluation.stability import format_table, token_stability
    from digit.tokenizers import load_tokenizer
    from digit.utils.io import atomic_write_json

    if any(s != s for s in args.snr):
        raise DigitError("--snr values must be numbers")
    device = resolve_device(args.device)
    source = open_image_source(args.data, args.layout)
    tok = load_tokenizer(args.tokenizer, device=device)
    if hasattr(tok, "set_precision"):
        tok.set_precision(args.precision)
    elif args.precision != "auto":
        raise DigitError("--precision applies to discriminative tokenizers")
    ds = ImageDataset(source, tok.image_size)
    if args.limit:
        ds = Subset(ds, spread_indices(len(ds), args.limit))
    skipped = SkipReport(source)

    def batches():
        for b in image_loader(ds, args.batch_size, args.workers):
            skipped.add(b["failures"])
            if len(b["indices"]):
                yield b["images"]

    result = token_stability(tok, batches(), args.snr, seed=args.seed, total=len(ds), noise_space=args.noise_space)
    skipped.require_usable(result["n_images"])
    result["tokenizer"] = str(args.tokenizer)
    result["data"] = str(args.data)
    print(format_table(result))
    print(skipped.summary())
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0

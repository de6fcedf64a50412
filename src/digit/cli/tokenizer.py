"""`digit tokenizer fit|from-centroids`: build a discriminative tokenizer directory; `digit tokenizer knn`: how
discriminative its latent space is (kNN top-1 of its mean-pooled features)."""

from __future__ import annotations

import argparse

from digit.cli.common import (
    add_device_arg,
    add_output_args,
    existing_dir,
    existing_path,
    json_object,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_device,
    unit_fraction,
)


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoder")
    g.add_argument(
        "--encoder",
        required=True,
        help="timm ViT name (e.g. vit_base_patch14_reg4_dinov2), timm CNN name (e.g. tf_efficientnet_lite0) "
        "or an encoder DIR",
    )
    g.add_argument("--encoder-kwargs", type=json_object, default={}, help="JSON passed to timm, e.g. '{\"depth\": 2}'")
    w = g.add_mutually_exclusive_group()
    w.add_argument(
        "--encoder-weights",
        type=weights_arg,
        help="local timm/safetensors file, original DINOv2 .pth, or 'auto': the weights of an installed package "
        "(see `digit weights`)",
    )
    w.add_argument("--pretrained", action="store_true", help="timm/HF hub weights (needs internet or a warm cache)")
    w.add_argument("--random-init", action="store_true", help="random weights: tests and demos only")
    g.add_argument("--image-size", type=positive_int, help="encoder input size (default: the encoder's own)")
    g.add_argument(
        "--layer",
        type=layer_arg,
        default=None,
        help="ViT: features after block L-N, then the final norm (default 3, or the layer an encoder directory "
        "names: 1 for a distilled student); CNN: strideS picks the feature map of "
        "stride S (e.g. stride16), N the N-th map from the end (default stride16); the grid is image size / stride",
    )
    g.add_argument("--encoder-seed", type=int, default=0, help="seed for --random-init weights")
    g.add_argument(
        "--pos-embed-interpolation",
        choices=["auto", "digit", "timm"],
        default="auto",
        help="how loaded weights' position table is resized to --image-size: 'digit' as DiGIT's DINOv2 copy "
        "(bicubic by scale factor (g + 0.1) / M, no antialias; reproduces DiGIT's tokens), 'timm' timm's antialiased "
        "resize (the hub / HF models); auto (default) = digit for DINOv2 weights, timm otherwise",
    )
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="encoder precision: auto = bf16 on CUDA, fp32 on CPU",
    )


def weights_arg(value: str):
    return "auto" if value == "auto" else existing_path(value)


def layer_arg(value: str):
    from digit.errors import DigitError
    from digit.tokenizers.cnn_encoder import parse_layer

    try:
        return parse_layer(value)
    except DigitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def default_layer(encoder: str) -> int | str:
    """The layer an encoder directory names (a distilled student: its output, 1), else 3 (DiGIT's ViT default),
    stride16 for a timm CNN."""
    from pathlib import Path

    from digit.tokenizers.cnn_encoder import is_cnn_name

    if Path(encoder).is_dir():
        cfg = Path(encoder) / "encoder.json"
        if cfg.is_file():
            from digit.utils.artifacts import STR, read_json_object

            meta = read_json_object(cfg, {"name": STR})
            if isinstance(meta.get("layer"), int) and not isinstance(meta["layer"], bool) and meta["layer"] >= 1:
                return meta["layer"]
            return "stride16" if is_cnn_name(meta["name"]) else 3
        return 3
    return "stride16" if is_cnn_name(encoder) else 3


def build_encoder_from_args(args: argparse.Namespace, device):
    from digit.tokenizers.encoder import build_encoder

    if args.layer is None:
        args.layer = default_layer(args.encoder)
    enc = build_encoder(
        args.encoder,
        args.encoder_kwargs,
        weights=args.encoder_weights,
        random_init=args.random_init,
        pretrained=args.pretrained,
        image_size=args.image_size,
        layer=args.layer,
        seed=args.encoder_seed,
        pos_embed_interpolation=args.pos_embed_interpolation,
    )
    return enc.to(device).set_precision(args.precision)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", type=existing_path, required=True, help="image folder (ImageFolder or flat) or .tar/.tar.gz"
    )
    p.add_argument(
        "--layout", choices=["auto", "imagefolder", "flat"], default="auto", help="source layout (default auto)"
    )
    p.add_argument("--strict", action="store_true", help="stop at the first undecodable file instead of skipping it")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader decoding workers (default 2)")


def smooth_arg(value: str) -> int:
    from digit.errors import DigitError
    from digit.tokenizers.discriminative import check_smooth

    try:
        return check_smooth(int(value))
    except (ValueError, DigitError):
        raise argparse.ArgumentTypeError(f"must be an odd integer >= 1 (1 = off): {value}") from None


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="build a discriminative tokenizer (encoder + K-means codebook)")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)

    f = tsub.add_parser(
        "fit",
        help="fit a K-means codebook on encoder patch features",
        description="Stream images through a frozen ViT, sample patch features, fit faiss K-means, "
        "write a tokenizer directory (tokenizer.json + centroids.npy).",
    )
    add_encoder_args(f)
    add_data_args(f)
    f.add_argument("--clusters", type=positive_int, required=True, help="codebook size K")
    f.add_argument(
        "--sample-frac", type=unit_fraction, default=0.1, help="fraction of each image's patches kept (default 0.1)"
    )
    f.add_argument("--max-points", type=positive_int, help="feature reservoir size (default K*256, faiss's cap)")
    f.add_argument("--niter", type=positive_int, default=20, help="K-means iterations (default 20)")
    f.add_argument("--no-augment", action="store_true", help="center crops instead of random crop + flip")
    f.add_argument(
        "--limit",
        type=positive_int,
        help="N images spread evenly over the source (every (count/N)-th: each class of a class-sorted folder keeps its share)",
    )
    f.add_argument("--batch-size", type=positive_int, default=64)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument(
        "--smooth",
        type=smooth_arg,
        default=1,
        help="average each feature over its KxK grid neighbourhood (K odd, in-bounds positions only), then layer-norm "
        "it, before K-means and at encode time; stored in tokenizer.json (default 1 = off)",
    )
    add_device_arg(f)
    add_output_args(f, "output tokenizer directory")
    f.set_defaults(func=run_fit)

    c = tsub.add_parser("from-centroids", help="wrap an existing codebook (e.g. DiGIT's km_8k.npy) as a tokenizer")
    add_encoder_args(c)
    c.add_argument("--centroids", type=existing_path, required=True, help=".npy float [K, D] codebook")
    add_device_arg(c)
    add_output_args(c, "output tokenizer directory")
    c.set_defaults(func=run_from_centroids)

    k = tsub.add_parser(
        "knn",
        help="kNN top-1 of a tokenizer's mean-pooled features: a labelled bank of training images vs labelled queries",
        description="Weighted kNN (k=20, T=0.07, as DINO's monitor) on the mean-pooled vectors the tokenizer quantises "
        "(after any --smooth): the same protocol for every encoder, e.g. "
        "`digit tokenizer knn --tokenizer tok --bank-data data/train --data data/val --bank 10000 --out knn.json`.",
    )
    k.add_argument("--tokenizer", type=existing_dir, required=True, help="discriminative tokenizer directory")
    k.add_argument("--bank-data", type=existing_path, required=True, help="labelled training images (the bank)")
    k.add_argument("--data", type=existing_path, required=True, help="labelled query images (e.g. the val split)")
    k.add_argument("--bank", type=non_negative_int, default=0, help="a seeded random N of the bank images (0: all)")
    k.add_argument(
        "--limit", type=positive_int, help="N query images spread evenly over --data (each class keeps its share)"
    )
    k.add_argument("--k", type=positive_int, default=20, help="neighbours (default 20)")
    k.add_argument("--temperature", type=positive_float, default=0.07, help="vote weight exp(sim / T) (default 0.07)")
    k.add_argument("--seed", type=int, default=0, help="seed of the bank subset")
    k.add_argument("--batch-size", type=positive_int, default=128)
    k.add_argument("--workers", type=non_negative_int, default=2)
    add_device_arg(k)
    k.add_argument("--out", help="write the result JSON here")
    k.set_defaults(func=run_knn)


def _inputs(args: argparse.Namespace, data) -> tuple:
    from pathlib import Path

    encoder_dir = Path(args.encoder) if Path(args.encoder).exists() else None
    return (data, encoder_dir, args.encoder_weights)


def run_fit(args: argparse.Namespace) -> int:
    from digit.data.sources import open_image_source
    from digit.tokenizers.discriminative import check_smooth
    from digit.tokenizers.fit import fit_tokenizer
    from digit.utils.outputs import output_dir

    target = output_dir(args.out, kind="tokenizer", inputs=_inputs(args, args.data), overwrite=args.overwrite)
    device = resolve_device(args.device)
    source = open_image_source(args.data, args.layout)
    encoder = build_encoder_from_args(args, device)
    check_smooth(args.smooth, encoder.grid_size)  # the grid is known only now
    print(
        f"source: {source.describe()}; encoder {args.encoder} layer {args.layer}, grid {encoder.grid_size}, dim {encoder.embed_dim}"
    )
    tok, report = fit_tokenizer(
        encoder,
        source,
        clusters=args.clusters,
        sample_frac=args.sample_frac,
        max_points=args.max_points,
        niter=args.niter,
        seed=args.seed,
        batch_size=args.batch_size,
        workers=args.workers,
        strict=args.strict,
        augment=not args.no_augment,
        limit=args.limit,
        smooth=args.smooth,
    )
    print(f"{report.skipped.summary()}")
    tok.save(tmp := target.begin())
    target.publish(tmp)
    print(
        f"fitted K={args.clusters} on {report.n_features_used} of {report.n_features_seen} patch features "
        f"from {report.n_images} images -> {args.out}"
    )
    return 0


def run_from_centroids(args: argparse.Namespace) -> int:
    from digit.tokenizers.discriminative import DiscriminativeTokenizer, load_centroids
    from digit.utils.outputs import output_dir

    target = output_dir(args.out, kind="tokenizer", inputs=_inputs(args, args.centroids), overwrite=args.overwrite)
    device = resolve_device(args.device)
    centroids = load_centroids(args.centroids)
    encoder = build_encoder_from_args(args, device)
    tok = DiscriminativeTokenizer(encoder, centroids, extra={"centroids_source": str(args.centroids)})
    tok.save(tmp := target.begin())
    target.publish(tmp)
    print(f"tokenizer K={tok.vocab_size} D={tok.dim} grid {tok.grid_size} -> {args.out}")
    return 0


def run_knn(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from torch.utils.data import Subset

    from digit.data.datasets import ImageDataset, SkipReport, image_loader, spread_indices
    from digit.data.sources import open_image_source
    from digit.errors import DigitError
    from digit.evaluation.tokenizer_knn import tokenizer_knn
    from digit.tokenizers import load_tokenizer
    from digit.utils.io import atomic_write_json

    tok = load_tokenizer(args.tokenizer, device=resolve_device(args.device))
    if not hasattr(tok, "features"):
        raise DigitError(f"{args.tokenizer} is not a discriminative tokenizer: kNN reads the features it quantises")
    bank_src, query_src = open_image_source(args.bank_data), open_image_source(args.data)
    for name, src in (("--bank-data", bank_src), ("--data", query_src)):
        if not src.labeled:
            raise DigitError(f"{name} {src.describe()} has no class labels (an ImageFolder of class folders is needed)")
    missing = sorted(set(query_src.class_names) - set(bank_src.class_names))
    if missing:
        raise DigitError(f"--data has classes the bank lacks: {', '.join(missing)} (bank: {bank_src.class_names})")
    # labels are indices into each source's own sorted class list: map the queries' onto the bank's by name
    to_bank = torch.tensor([bank_src.class_names.index(n) for n in query_src.class_names], dtype=torch.long)
    bank_ds, query_ds = ImageDataset(bank_src, tok.image_size), ImageDataset(query_src, tok.image_size)
    if args.bank and args.bank < len(bank_ds):
        keep = np.sort(np.random.default_rng(args.seed).choice(len(bank_ds), args.bank, replace=False))
        bank_ds = Subset(bank_ds, keep.tolist())
    if args.limit:
        query_ds = Subset(query_ds, spread_indices(len(query_ds), args.limit))
    skipped = {"bank": SkipReport(bank_src), "queries": SkipReport(query_src)}

    def batches(ds, report, label_map=None):
        for b in image_loader(ds, args.batch_size, args.workers):
            report.add(b["failures"])
            if len(b["indices"]):
                yield b["images"], b["labels"] if label_map is None else label_map[b["labels"]]

    result = tokenizer_knn(tok, batches(bank_ds, skipped["bank"]), batches(query_ds, skipped["queries"], to_bank),
                           num_classes=len(bank_src.class_names), k=args.k, temperature=args.temperature,
                           totals=(len(bank_ds), len(query_ds)))  # fmt: skip
    for name, report in skipped.items():
        report.require_usable(result[name])
    result |= {"tokenizer": str(args.tokenizer), "bank_data": str(args.bank_data), "data": str(args.data),
               "bank_seed": args.seed}  # fmt: skip
    print(f"kNN top-1 {result['knn_top1']:.2%} ({result['queries']} queries, bank of {result['bank']}, k={args.k})")
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0

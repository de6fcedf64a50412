"""`digit convert`: released checkpoints -> this project's run / tokenizer / VQ directories.

    digit convert digit --stage1 CKPT [--stage2 CKPT] [--kmeans km_8k.npy] [--dinov2 PTH] [--vqgan CKPT] --out DIR
    digit convert llamagen --gpt c2i_B_256.pt [--vq vq_ds16_c2i.pt] --out DIR
    digit convert upgrade RUN          # a run directory written before the GPT's one module naming -> current format

Pickled files are read with ``weights_only=True`` first and otherwise with a restricted unpickler that rebuilds only
tensors, plain containers and config objects (see `digit.convert.unpickler`); a file asking for anything else is
refused. The output directory is written in a staging directory and moved into place when complete.
"""

from __future__ import annotations

import argparse

from digit.cli.common import existing_path, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert released checkpoints (DiGIT, LlamaGen, DINOv2, MAGE VQGAN) into digit directories",
        description="Convert released weights into run / tokenizer / VQ directories used by sample, generate, probe "
        "and eval. See docs/released-weights.md for download links and the published numbers.",
    )
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)

    d = sub.add_parser(
        "digit",
        help="DiGIT fairseq checkpoints (+ K-means, DINOv2, MAGE VQGAN)",
        description="Writes DIR/stage1 (run), DIR/stage2 (run, with --stage2), DIR/tokenizer (DINOv2 + K-means, when "
        "the encoder and centroids are available from the flags or the checkpoint) and DIR/vqgan (with --vqgan).",
    )
    d.add_argument("--stage1", type=existing_path, required=True, help="stage-1 (stlm) or VQ-baseline checkpoint .pt")
    d.add_argument("--stage2", type=existing_path, help="stage-2 decoder checkpoint (st2vtlm AR or st2vtlm_nar)")
    d.add_argument("--kmeans", type=existing_path, help="K-means centroids km_8k.npy / km_16k.npy [K, D] "
                   "(default: the checkpoints' own `centroids`)")  # fmt: skip
    d.add_argument("--dinov2", type=existing_path, help="original DINOv2 checkpoint, e.g. dinov2_vitb14_reg4_pretrain.pth "
                   "(default: the encoder copy inside the checkpoint)")  # fmt: skip
    d.add_argument("--vqgan", type=existing_path, help="MAGE VQGAN vqgan_jax_strongaug.ckpt "
                   "(default: the copy inside the stage-2 checkpoint)")  # fmt: skip
    d.add_argument("--grid", type=positive_int, nargs=2, default=(16, 16), metavar=("H", "W"),
                   help="token grid (DiGIT: 16 16)")  # fmt: skip
    d.add_argument("--image-size", type=positive_int, default=224, help="encoder input size (DiGIT: 224)")
    d.add_argument("--dinov2-interpolation", choices=("digit", "timm"), default="digit",
                   help="position-table resampling: 'digit' reproduces DiGIT's copy (bicubic, antialias off, offset "
                   "0.1, tokens depend on it); 'timm' uses timm's antialiased resize")  # fmt: skip
    d.add_argument("--dinov2-heads", type=positive_int, help="attention heads of a DINOv2 that is none of DINOv2's "
                   "sizes (ViT-S/B/L/g: known); required there, as the weights do not say")  # fmt: skip
    d.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    d.add_argument("--out", required=True, help="output directory")
    d.set_defaults(func=run_digit)

    g = sub.add_parser(
        "llamagen",
        help="LlamaGen c2i or t2i GPT (+ VQ tokenizer)",
        description="Writes DIR/gpt (run directory) and DIR/vq (VQ tokenizer directory, with --vq).",
    )
    g.add_argument(
        "--gpt", type=existing_path, required=True, help="c2i_*.pt or t2i_*.pt (DDP dict or FSDP consolidated.pth)"
    )
    g.add_argument("--vq", type=existing_path, help="vq_ds16_c2i.pt")
    g.add_argument("--image-size", type=positive_int, help="GPT image size (default: args in the file or its name)")
    g.add_argument("--heads", type=positive_int, help="attention heads (default: args.gpt_model / LlamaGen's sizes)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    g.add_argument("--out", required=True, help="output directory")
    g.set_defaults(func=run_llamagen)

    u = sub.add_parser(
        "upgrade",
        help="rewrite a former GPT run directory (config with 'arch', LlamaGen / fairseq key names) in the current format",
        description="Rewrites RUN/config.json and RUN/model.safetensors with the current module names and behaviour "
        "switches (each file atomically). Not needed to use a former run: it is converted in memory when loaded. "
        "A run with train_state.pt (resumable) is refused.",
    )
    u.add_argument("run", type=existing_path, help="run directory (config.json + model.safetensors)")
    u.set_defaults(func=run_upgrade)


def _staged(args: argparse.Namespace, write) -> int:
    from pathlib import Path

    from digit.utils.outputs import output_dir

    out = Path(args.out)
    inputs = [getattr(args, k, None) for k in ("stage1", "stage2", "kmeans", "dinov2", "vqgan", "gpt", "vq")]
    with output_dir(out, kind=f"convert {args.source}", inputs=inputs, overwrite=args.overwrite).stage() as tmp:
        written = write(tmp)
    for piece, path in written.items():
        print(f"{piece}: {out / Path(path).name}")
    return 0


def run_digit(args: argparse.Namespace) -> int:
    from digit.convert.digit import convert_digit

    def write(tmp):
        return convert_digit(
            tmp, stage1=str(args.stage1), stage2=str(args.stage2) if args.stage2 else None,
            kmeans=str(args.kmeans) if args.kmeans else None, dinov2=str(args.dinov2) if args.dinov2 else None,
            vqgan=str(args.vqgan) if args.vqgan else None, grid=tuple(args.grid), image_size=args.image_size,
            interpolation=args.dinov2_interpolation, encoder_heads=args.dinov2_heads,
        )  # fmt: skip

    return _staged(args, write)


def run_llamagen(args: argparse.Namespace) -> int:
    from digit.convert.llamagen import convert_llamagen

    def write(tmp):
        return convert_llamagen(tmp, gpt=str(args.gpt), vq=str(args.vq) if args.vq else None,
                                image_size=args.image_size, n_heads=args.heads)  # fmt: skip

    return _staged(args, write)


def run_upgrade(args: argparse.Namespace) -> int:
    from digit.convert.keys import upgrade_run_dir

    changed = upgrade_run_dir(args.run)
    print(f"{args.run}: {'rewritten in the current format' if changed else 'already in the current format'}")
    return 0

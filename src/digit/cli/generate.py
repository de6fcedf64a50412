"""`digit generate`: class labels -> PNGs through stage 1 -> (stage-2 decoder) -> VQ decode."""

from __future__ import annotations

import argparse

from digit.cli.common import (
    add_device_arg,
    add_output_args,
    existing_dir,
    non_negative_int,
    positive_int,
    unit_fraction,
)


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images end to end (stage 1 -> decoder -> VQGAN)",
        description="DiGIT: --stage1 RUN --decoder RUN --vq DIR (the decoder turns discriminative tokens into VQ "
        "tokens, AR or MaskGIT). LlamaGen: --stage1 RUN --vq DIR (the GPT samples VQ tokens). Writes grid.png, one "
        "PNG per image under images/, samples.npz (uint8 [N, H, W, 3] + labels) and meta.json. Mismatched pieces are "
        "refused before sampling.",
    )
    p.add_argument("--stage1", type=existing_dir, required=True, help="stage-1 GPT run directory")
    p.add_argument("--decoder", type=existing_dir, help="stage-2 decoder run (prefix-conditioned on stage-1 tokens)")
    p.add_argument("--vq", type=existing_dir, required=True, help="VQ tokenizer directory")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("-n", type=positive_int, help="number of images (class-balanced for a class-conditional model)")
    who.add_argument("--classes", nargs="+", metavar="C", help="one image per listed class (index or class name)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=0, help="stage-1 top-k (0 = off)")
    p.add_argument("--top-p", type=unit_fraction, default=1.0, help="stage-1 top-p (1 = off)")
    p.add_argument("--decoder-top-k", type=non_negative_int, default=0)
    p.add_argument(
        "--official-sampling",
        action="store_true",
        help="fairseq's decoder sampling for converted DiGIT runs (top-p on un-renormalised probabilities)",
    )
    p.add_argument("--decoder-top-p", type=unit_fraction, help="decoder top-p (default 0.8 AR as DiGIT, 1.0 MaskGIT)")
    # 8 = digit.sampling.maskgit.DIGIT_NAR_STEPS (not imported here: the parser stays torch-free); a test ties them
    p.add_argument("--decoder-steps", type=positive_int, default=8,
                   help="MaskGIT decoding steps, NAR decoder (default 8: DiGIT's released inference script)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=16)
    add_device_arg(p)
    add_output_args(p, "output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from digit.cli.common import resolve_device
    from digit.errors import DigitError
    from digit.pipeline import SamplingConfig, generate_images, image_grid, load_pipeline, resolve_labels, save_png
    from digit.utils.io import atomic_write, atomic_write_json
    from digit.utils.outputs import output_dir

    out = Path(args.out)
    target = output_dir(out, kind="generate", inputs=(args.stage1, args.decoder, args.vq), overwrite=args.overwrite)
    device = resolve_device(args.device)
    pipe = load_pipeline(args.stage1, args.vq, args.decoder, device=device)  # refuses mismatches, samples nothing
    labels = resolve_labels(pipe, args.n, args.classes)
    if pipe.decoder is None and (args.decoder_top_p is not None or args.decoder_top_k):
        raise DigitError("--decoder-top-p/--decoder-top-k need a --decoder")
    if args.official_sampling and (pipe.kind != "digit-ar" or pipe.decoder_special_rows is None):
        raise DigitError(
            "--official-sampling needs an AR --decoder converted from DiGIT (with official_head.safetensors)"
        )
    sampling = SamplingConfig(
        cfg_scale=args.cfg_scale,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        decoder_top_k=args.decoder_top_k,
        decoder_top_p=args.decoder_top_p,
        decoder_steps=args.decoder_steps,
        decoder_official=args.official_sampling,
    )
    print(f"{pipe.kind}: {len(labels)} images, VQ {pipe.vq.image_size}px, on {device}")
    res = generate_images(pipe, labels, sampling, batch_size=args.batch_size, seed=args.seed, progress=True)

    names = pipe.class_names
    captions = [
        (names[v] if v < len(names) else f"class {v}") if v >= 0 else f"#{i}" for i, v in enumerate(res.labels.tolist())
    ]
    tmp = target.begin()
    (tmp / "images").mkdir()
    for i, img in enumerate(res.images):
        save_png(tmp / "images" / f"{i:06d}.png", img)
    save_png(tmp / "grid.png", image_grid(res.images[:64], captions[:64]))

    def write_npz(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, images=res.images, labels=res.labels)

    atomic_write(tmp / "samples.npz", write_npz)
    total = sum(res.seconds.values())
    atomic_write_json(tmp / "meta.json", {
        "kind": pipe.kind,
        "stage1": str(Path(args.stage1).resolve()),
        "decoder": str(Path(args.decoder).resolve()) if args.decoder else None,
        "vq": str(Path(args.vq).resolve()),
        "n": int(len(labels)),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "sampling": {**vars(sampling), "decoder_steps": args.decoder_steps},
        "seconds": res.seconds,
        "images_per_s": len(labels) / max(total, 1e-9),
    })  # fmt: skip
    target.publish(tmp)
    print(
        f"wrote {len(labels)} images to {out} ({len(labels) / max(total, 1e-9):.2f} img/s; "
        + ", ".join(f"{k} {v:.2f}s" for k, v in res.seconds.items())
        + ")"
    )
    return 0

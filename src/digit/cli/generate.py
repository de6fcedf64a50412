"""`digit generate`: class labels (or prompts, for a text-conditional stage 1) -> PNGs through stage 1 -> (stage-2
decoder) -> VQ decode."""

from __future__ import annotations

import argparse
from pathlib import Path

from digit.cli.common import add_device_arg, add_output_args, add_text_encoder_args, existing_dir, positive_int
from digit.cli.sample import AR_FIELDS
from digit.sampling.params import SamplingParams
from digit.sampling.precision import add_precision_arg

# the stage-2 decoder's copy: AR (top-p 0.8 by default, DiGIT; --decoder-decode jacobi) or MaskGIT (its steps and
# confidence noise)
DECODER_FIELDS = ("temperature", "top_k", "top_p", "decode", "nar_steps", "nar_temperature")


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images end to end (stage 1 -> decoder -> VQGAN)",
        description="DiGIT: --stage1 RUN --decoder RUN --vq DIR (the decoder turns discriminative tokens into VQ "
        "tokens, AR or MaskGIT). LlamaGen: --stage1 RUN --vq DIR (the GPT samples VQ tokens). A text-conditional "
        "stage 1 takes --prompt/--prompts and --text-encoder instead of classes. Writes grid.png, one "
        "PNG per image under images/, samples.npz (uint8 [N, H, W, 3] + labels) and meta.json. Mismatched pieces are "
        "refused before sampling. Sharded: `torchrun --nproc_per_node N -m digit generate ...` (rank 0 writes the same "
        "output as one process).",
    )
    p.add_argument("--stage1", type=existing_dir, required=True, help="stage-1 GPT run directory")
    p.add_argument("--decoder", type=existing_dir, help="stage-2 decoder run (prefix-conditioned on stage-1 tokens)")
    p.add_argument("--vq", type=existing_dir, required=True, help="VQ tokenizer directory")
    p.add_argument(
        "-n", type=positive_int, help="number of images (class-balanced over --classes, or over every class)"
    )
    p.add_argument(
        "--classes", nargs="+", metavar="C", help="classes to sample (index or name); alone: one image per class"
    )
    t = p.add_argument_group("text-conditional stage 1 (instead of classes; -n is spread over the prompts)")
    t.add_argument("--prompt", action="append", default=None, help="a caption to sample (repeatable)")
    t.add_argument("--prompts", type=Path, default=None, help="a file of captions, one per line")
    add_text_encoder_args(t, "the text encoder the stage-1 run was trained with")
    SamplingParams.add_arguments(p.add_argument_group("stage-1 sampling"), only=AR_FIELDS)
    SamplingParams.add_arguments(
        p.add_argument_group("stage-2 decoder sampling (default top-p 0.8 for an AR decoder as DiGIT, 1.0 MaskGIT)"),
        prefix="decoder-",
        only=DECODER_FIELDS,
        aliases={"nar_steps": "--decoder-steps"},
    )
    p.add_argument(
        "--official-sampling",
        action="store_true",
        help="fairseq's decoder sampling for converted DiGIT runs (top-p on un-renormalised probabilities)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    add_precision_arg(p)
    add_device_arg(p)
    add_output_args(p, "output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from digit.cli.common import resolve_rank_device, text_encoder_dir
    from digit.errors import DigitError
    from digit.pipeline import decoder_defaults, generate_images, load_pipeline, merge_results, resolve_labels
    from digit.sampling.precision import cast_for_sampling
    from digit.utils.distributed import gather_to_main, init_distributed
    from digit.utils.outputs import output_dir

    stage1 = SamplingParams.from_args(args)  # refuses bad values before any model is loaded
    SamplingParams.from_args(args, prefix="decoder-")  # the decoder's flags too (its defaults need the pipeline)
    out = Path(args.out)
    args.text_encoder = text_encoder_dir(args)  # a hub id -> its cached (or, with --pretrained, downloaded) snapshot
    # every rank checks the output (the same verdict everywhere, so no rank waits for one that gave up)
    target = output_dir(
        out, kind="generate", inputs=(args.stage1, args.decoder, args.vq, args.text_encoder), overwrite=args.overwrite
    )
    dist = init_distributed()
    device = resolve_rank_device(args.device, dist.local_rank)
    # refuses mismatches (and a text encoder the run was not trained with), samples nothing
    pipe = load_pipeline(args.stage1, args.vq, args.decoder, device=device, text_encoder=args.text_encoder)
    prompts = _prompts(args, pipe)
    labels = np.full(len(prompts), -1, np.int64) if prompts is not None else resolve_labels(pipe, args.n, args.classes)
    # the GPTs only: the VQ decoder stays fp32
    args.precision = cast_for_sampling(pipe.stage1, args.precision)
    if pipe.decoder is not None:
        cast_for_sampling(pipe.decoder, args.precision)
    if pipe.decoder is None and any(getattr(args, f"decoder_{f}") is not None for f in DECODER_FIELDS):
        raise DigitError("--decoder-* sampling flags need a --decoder")
    if args.official_sampling and (pipe.kind != "digit-ar" or pipe.decoder_special_rows is None):
        raise DigitError(
            "--official-sampling needs an AR --decoder converted from DiGIT (with official_head.safetensors)"
        )
    decoder = SamplingParams.from_args(args, prefix="decoder-", base=decoder_defaults(pipe.kind))
    if decoder.decode == "jacobi" and (pipe.kind != "digit-ar" or args.official_sampling):
        raise DigitError(
            "--decoder-decode jacobi needs an AR --decoder with the standard filters (no --official-sampling)"
        )
    if dist.is_main:
        print(f"{pipe.kind}: {len(labels)} images, VQ {pipe.vq.image_size}px, on {device} x {dist.world_size}")
    # under torchrun each rank samples every world_size-th batch (image i keeps its own generator); rank 0 merges
    part = generate_images(
        pipe,
        labels,
        stage1,
        decoder,
        prompts=prompts,
        decoder_official=args.official_sampling,
        batch_size=args.batch_size,
        seed=args.seed,
        compile=args.compile,
        progress=dist.is_main,
        shard=(dist.rank, dist.world_size),
    )
    parts = gather_to_main(part)
    if not dist.is_main:
        return 0
    res = merge_results(parts)
    _write_output(args, target, pipe, res, stage1, decoder, len(labels), dist.world_size, prompts)
    return 0


def _prompts(args: argparse.Namespace, pipe) -> list[str] | None:
    """Image i's caption for a text-conditional stage 1 (None otherwise); the flags of the other kind refused."""
    from digit.errors import DigitError
    from digit.prompts import read_prompts, spread_prompts

    given = args.prompt is not None or args.prompts is not None
    if not pipe.is_text:
        if given or args.text_encoder is not None:
            raise DigitError(
                f"--prompt/--prompts/--text-encoder need a text-conditional --stage1 (this one is "
                f"{pipe.stage1.config.cond!r}-conditioned)"
            )
        return None
    if args.classes is not None:
        raise DigitError("--classes given but --stage1 is text-conditional: give --prompt TEXT or --prompts FILE")
    if not given or args.text_encoder is None:
        raise DigitError("a text-conditional --stage1 needs --prompt TEXT (or --prompts FILE) and --text-encoder DIR")
    return spread_prompts(read_prompts(args.prompt, args.prompts), args.n)


def _write_output(args, target, pipe, res, stage1, decoder, n, world_size, prompts) -> None:
    """grid.png, images/, samples.npz and meta.json, staged then moved into place (rank 0)."""
    import numpy as np

    from digit.utils.images import image_grid, save_png
    from digit.utils.io import atomic_write, atomic_write_json

    names = pipe.class_names
    captions = [
        (names[v] if v < len(names) else f"class {v}") if v >= 0 else f"#{i}" for i, v in enumerate(res.labels.tolist())
    ]
    if prompts is not None:  # the grid's labels: each image's caption (ASCII: the default bitmap font's range)
        captions = [p.encode("ascii", "replace").decode("ascii") for p in prompts]
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
        "n": int(n),
        "world_size": world_size,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "prompts": prompts,  # image i's caption (text-conditional stage 1), else null
        "text_encoder": pipe.text_encoder.identity() if pipe.text_encoder is not None else None,
        "sampling": {
            "stage1": stage1.to_dict(),
            "decoder": decoder.to_dict() if pipe.decoder is not None else None,
            "decoder_official": args.official_sampling,
            "precision": args.precision,
        },
        "forward_passes": res.forward_passes,  # model forward passes per stage over all batches and ranks
        "seconds": res.seconds,
        "images_per_s": n / max(total, 1e-9),
    })  # fmt: skip
    target.publish(tmp)
    print(
        f"wrote {n} images to {args.out} ({n / max(total, 1e-9):.2f} img/s; "
        + ", ".join(f"{k} {v:.2f}s" for k, v in res.seconds.items())
        + ")"
    )

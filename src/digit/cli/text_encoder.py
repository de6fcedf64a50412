"""`digit text-encoder build`: the offline text encoder, a small T5 built from a config (NOT pretrained).

    digit text-encoder build --captions scenes/train --out text-encoder [--vocab-size 1000 --d-model 64 --layers 2
                             --heads 4 --seed 0]

Trains a BPE tokenizer on the dataset's captions (the `tokenizers` library) and builds a `transformers` T5 encoder
with seeded random weights: a small T5 built from a config, not pretrained. It has no language knowledge; it exists so
that text-to-image runs work offline. Saved in the Hugging Face layout, so `--text-encoder DIR` (`digit tokenize
--captions`, `digit sample/generate --prompt`) loads it as it loads FLAN-T5. Needs `pip install transformers`.
"""

from __future__ import annotations

import argparse

from digit.cli.common import add_output_args, existing_path, non_negative_int, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "text-encoder",
        help="build the offline text encoder (tokenizer trained on captions + a small random-init T5, not pretrained)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="text_encoder_command", metavar="build", required=True)
    b = sub.add_parser(
        "build",
        help="tokenizer trained on the captions + a small T5 encoder built from a config (random init, not pretrained)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--captions", type=existing_path, required=True,
                   help="captioned images (a .txt beside each image, a metadata.jsonl, or name.jpg + name.txt in a tar)")  # fmt: skip
    b.add_argument("--layout", choices=["auto", "imagefolder", "flat"], default="auto")
    b.add_argument("--vocab-size", type=positive_int, default=1000, help="BPE vocabulary target (default 1000)")
    b.add_argument("--d-model", type=positive_int, default=64, help="T5 width = feature size (default 64)")
    b.add_argument("--layers", type=positive_int, default=2, help="T5 encoder blocks (default 2)")
    b.add_argument("--heads", type=positive_int, default=4, help="attention heads (default 4)")
    b.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random T5 weights")
    add_output_args(b, "text encoder directory to write (Hugging Face layout)")
    b.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    import json

    from digit.data.captions import with_captions
    from digit.data.small_t5 import SmallT5Config, build_small_t5
    from digit.data.sources import open_image_source
    from digit.utils.outputs import output_dir

    cfg = SmallT5Config(vocab_size=args.vocab_size, d_model=args.d_model, layers=args.layers, heads=args.heads,
                        seed=args.seed)  # fmt: skip
    target = output_dir(args.out, kind="text-encoder build", inputs=(args.captions,), overwrite=args.overwrite)
    _, texts = with_captions(open_image_source(args.captions, args.layout))
    with target.stage() as tmp:
        record = build_small_t5(texts, tmp, cfg, source=str(args.captions))
    print(json.dumps({"out": str(args.out), **record}))
    return 0

"""`digit scenes`: a captioned compositional-scenes dataset, its attribute classifier, and prompt alignment.

    digit scenes make --out scenes/ --n 2000 --size 32 --seed 0 [--holdout red-triangle,green-circle,blue-square]
    digit scenes classifier --data scenes/ --out classifier/ [--epochs 8 --seed 0]
    digit scenes alignment --classifier classifier/ --gen samples/ --prompts scenes/prompts.txt --out alignment.json

Scenes hold one or two shapes (colour, size, left or right half), captioned as "a large red circle to the left of a
small blue square". Held-out colour-shape pairs never appear in train/; the sampling prompts (prompts.txt) name seen
pairs, then held-out ones. The classifier is trained on real renders of every pair and scored on held-out renders;
alignment is the fraction of generated images whose predicted layout / shape / colour / size match their prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from digit.cli.common import (
    add_output_args,
    existing_dir,
    existing_path,
    non_negative_int,
    positive_float,
    positive_int,
)
from digit.errors import DigitError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "scenes",
        help="compositional captioned scenes: dataset, attribute classifier, prompt alignment of generated images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="scenes_command", metavar="make|classifier|alignment", required=True)
    m = sub.add_parser("make", help="write the captioned scenes dataset (train/, classifier splits, prompts.txt)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    m.add_argument("--n", type=positive_int, default=2000, help="training scenes, held-out pairs excluded (2000)")
    m.add_argument("--n-classifier", type=positive_int, default=2000, help="classifier training renders (2000)")
    m.add_argument("--n-test", type=positive_int, default=500, help="classifier test renders (500)")
    m.add_argument("--n-prompts", type=positive_int, default=24, help="sampling prompts per group: seen, unseen (24)")
    m.add_argument("--size", type=positive_int, default=32, help="image side in pixels (default 32)")
    m.add_argument("--seed", type=non_negative_int, default=0)
    m.add_argument("--holdout", default="red-triangle,green-circle,blue-square",
                   help="COLOR-SHAPE pairs kept out of train/, comma-separated, or 'none' "
                   "(default red-triangle,green-circle,blue-square)")  # fmt: skip
    add_output_args(m, "dataset directory to write")
    m.set_defaults(func=run_make)

    c = sub.add_parser("classifier", help="train the attribute classifier on real renders; report its test accuracy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    c.add_argument("--data", type=existing_dir, required=True, help="a `digit scenes make` directory")
    c.add_argument("--epochs", type=positive_int, default=8)
    c.add_argument("--width", type=positive_int, default=32, help="channels of the first stage (default 32)")
    c.add_argument("--batch-size", type=positive_int, default=64)
    c.add_argument("--lr", type=positive_float, default=2e-3)
    c.add_argument("--seed", type=non_negative_int, default=0)
    add_output_args(c, "classifier directory to write")
    c.set_defaults(func=run_classifier)

    a = sub.add_parser("alignment", help="score generated images against their prompts (JSON)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    a.add_argument("--classifier", type=existing_dir, required=True, help="a `digit scenes classifier` directory")
    a.add_argument("--gen", type=existing_path, required=True, help="a `digit generate` output or a samples .npz")
    a.add_argument("--prompts", type=existing_path, default=None,
                   help="the prompts file given to `digit generate` (one per line; image i has prompt i mod count); "
                   "default: the prompts recorded in the generation's meta.json")  # fmt: skip
    a.add_argument("--out", default=None, metavar="FILE.json", help="write the result here")
    a.set_defaults(func=run_alignment)


def run_make(args: argparse.Namespace) -> int:
    from digit.data.scenes import ScenesConfig, parse_holdout, write_scenes
    from digit.utils.outputs import output_dir

    cfg = ScenesConfig(n=args.n, n_classifier=args.n_classifier, n_test=args.n_test, n_prompts=args.n_prompts,
                       size=args.size, seed=args.seed, holdout=parse_holdout(args.holdout))  # fmt: skip
    if cfg.size < 16 or cfg.size % 8:
        raise DigitError(f"--size {cfg.size}: must be a multiple of 8, at least 16")
    target = output_dir(args.out, kind="scenes make", overwrite=args.overwrite)
    with target.stage() as tmp:
        record = write_scenes(tmp, cfg, progress=True)
    print(json.dumps({"out": str(args.out), "splits": record["splits"], "holdout": record["holdout"]}))
    return 0


def run_classifier(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from digit.data.scenes import parse_caption, read_scenes_info, read_split
    from digit.evaluation.alignment import (
        ClassifierConfig,
        alignment_summary,
        predict,
        prompts_targets,
        save_classifier,
        scene_targets,
        train_classifier,
    )
    from digit.utils.outputs import output_dir

    info = read_scenes_info(args.data)
    holdout = {tuple(p) for p in info["holdout"]}
    target = output_dir(args.out, kind="scenes classifier", inputs=(args.data,), overwrite=args.overwrite)
    images, texts = read_split(Path(args.data) / "classifier-train")
    cfg = ClassifierConfig(image_size=int(images.shape[1]), width=args.width, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed)  # fmt: skip
    t0 = time.perf_counter()
    net, losses = train_classifier(images, scene_targets([parse_caption(t) for t in texts]), cfg, progress=True)
    test_images, test_texts = read_split(Path(args.data) / "classifier-test")
    tgt, unseen = prompts_targets(test_texts, holdout)
    test = alignment_summary(predict(net, test_images), tgt, unseen)
    record = {"holdout": sorted(list(p) for p in holdout), "train_images": len(images), "losses": losses,
              "train_s": round(time.perf_counter() - t0, 1), "test": test, "data": str(args.data),
              "note": "test: the alignment of real held-out renders with their true captions (the ceiling)"}  # fmt: skip
    if not np.isfinite(losses).all():
        raise DigitError("the classifier's loss is not finite")
    with target.stage() as tmp:
        save_classifier(net, cfg, tmp, record)
    print(json.dumps({"out": str(args.out), "test": test}))
    return 0


def _prompts(args: argparse.Namespace, n: int) -> list[str]:
    if args.prompts is not None:
        try:
            lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DigitError(f"--prompts {args.prompts}: {e}") from e
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise DigitError(f"--prompts {args.prompts}: no prompts")
        return [prompts[i % len(prompts)] for i in range(n)]
    meta = Path(args.gen) / "meta.json"
    recorded = json.loads(meta.read_text(encoding="utf-8")).get("prompts") if meta.is_file() else None
    if not (isinstance(recorded, list) and len(recorded) == n and all(isinstance(p, str) for p in recorded)):
        raise DigitError(f"{args.gen}: no prompt list for its {n} images in meta.json; pass --prompts FILE")
    return recorded


def run_alignment(args: argparse.Namespace) -> int:
    from digit.evaluation.alignment import alignment_summary, load_classifier, predict, prompts_targets, read_generated
    from digit.utils.io import atomic_write_json

    net, rec = load_classifier(args.classifier)
    images = read_generated(args.gen)
    size = rec["config"]["image_size"]
    if images.shape[1:3] != (size, size):
        raise DigitError(f"{args.gen}: images are {images.shape[1]}x{images.shape[2]}, the classifier reads {size}px")
    prompts = _prompts(args, len(images))
    tgt, unseen = prompts_targets(prompts, {tuple(p) for p in rec["holdout"]})
    result = {
        "gen": str(args.gen), "prompts": str(args.prompts) if args.prompts else "meta.json", "n": len(images),
        "alignment": alignment_summary(predict(net, images), tgt, unseen),
        "classifier": {"dir": str(args.classifier), "test": rec["test"], "holdout": rec["holdout"]},
    }  # fmt: skip
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result["alignment"]))
    return 0

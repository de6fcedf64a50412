"""`digit recipe cifar10`: the reference runs, in order, resumable, then the paper's claims measured and summarised.

    digit recipe cifar10 --data ../shared/data/cifar10-train.tar.gz --out runs/cifar10 [--size cpu|small|tiny]
        [--encoder dino effnet] [--seeds 0 1 2] [--baseline results/cifar10-summary.json]
    digit recipe cifar10 --data ... --out runs/cifar10 --dry-run      # print the commands only

Every step is a plain `digit` command (printed before it runs). Interrupt at any time and run the same command again:
finished steps are skipped and training steps continue from their last checkpoint. What does not depend on the encoder
route or the GPT seed (split, VQ tokenizer and tokens, FID reference statistics) is done once per --out, so another
route or more seeds later reuse it. At the end ``summary.json`` and ``summary.md`` (per route: the claims with mean and
spread over seeds, and the verdicts by the stated rules) are written in --out; ``digit recipe ship`` copies one route
and seed's small inference files into a folder `digit demo --models` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from digit.cli.common import add_output_args, existing_dir, existing_path, non_negative_int
from digit.errors import DigitError
from digit.recipes.cifar10 import ROUTE_HELP, ROUTES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "recipe",
        help="end-to-end recipes: the CIFAR-10 reference runs and claims; the text-to-image scenes measurement",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    c = sub.add_parser(
        "cifar10",
        help="encoder -> K-means tokenizer -> VQ -> stage 1 -> stage 2 -> GPT on VQ tokens -> claims",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--data", type=existing_path, required=True, help="CIFAR-10 train archive or labelled folder")
    c.add_argument("--out", required=True, help="recipe directory (created; rerun the command to resume)")
    c.add_argument(
        "--size",
        choices=["cpu", "small", "tiny"],
        default="cpu",
        help="cpu: the reference run (~90 min on 2 cores); small: minutes; tiny: seconds, a smoke test",
    )
    c.add_argument(
        "--encoder",
        nargs="+",
        choices=ROUTES,
        default=["dino"],
        metavar="ROUTE",
        help="discriminative encoder route(s): " + "; ".join(f"{k}: {v}" for k, v in ROUTE_HELP.items()),
    )
    c.add_argument(
        "--seeds",
        nargs="+",
        type=non_negative_int,
        default=[0],
        metavar="S",
        help="GPT seeds (stage 1, stage 2, VQ-token GPT, sampling): one full comparison per seed (default 0)",
    )
    c.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the shared side (split, encoder, K-means, VQ)"
    )
    c.add_argument(
        "--fid-ref",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="training images behind the FID reference statistics (a seeded subset; 0 = all; default: the size's, "
        "10,000 at cpu). Changing it recomputes the statistics and every score",
    )
    c.add_argument(
        "--baseline",
        type=existing_path,
        default=None,
        metavar="SUMMARY.json",
        help="an earlier run's summary.json shown as a column (e.g. results/cifar10-summary.json)",
    )
    c.add_argument("--dry-run", action="store_true", help="print the steps' commands and exit")
    c.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: write summary.json / summary.md from the seeds whose every step has finished (safe while "
        "the recipe is still running in --out; e.g. to ship a seed's models before the other seeds end)",
    )
    c.set_defaults(func=run_cifar10)
    sc = sub.add_parser(
        "scenes",
        help="text-to-image prompt alignment: text-conditional GPTs on discriminative vs VQ tokens, captioned scenes",
        description=_scenes_doc(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sc.add_argument("--out", required=True, help="recipe directory (created; rerun the command to resume)")
    sc.add_argument(
        "--size",
        choices=["cpu", "tiny"],
        default="cpu",
        help="cpu: the measurement of results/scenes.md (~30 min on 2 cores); tiny: seconds, a smoke test",
    )
    sc.add_argument("--seed", type=non_negative_int, default=0)
    sc.add_argument("--dry-run", action="store_true", help="print the steps' commands and exit")
    sc.set_defaults(func=run_scenes)
    s = sub.add_parser(
        "ship",
        help="copy a finished recipe's inference files (safetensors + configs) into a demo model folder",
        description="Copies what `digit demo` needs from a finished recipe directory: the tokenizer with its encoder "
        "weights stored inside it, the VQ tokenizer, stage 1 and stage 2 (weights + config.json only), and a few "
        "validation images.",
    )
    s.add_argument("--recipe", type=existing_dir, required=True, help="a finished `digit recipe cifar10` directory")
    s.add_argument("--route", choices=ROUTES, default="dino", help="whose tokenizer and GPTs to ship (default dino)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="which GPT seed's models to ship (default 0)")
    add_output_args(s, "model folder to write (e.g. src/digit/assets/cifar10)")
    s.set_defaults(func=run_ship)


def run_cifar10(args: argparse.Namespace) -> int:
    from digit.recipes.cifar10 import RecipePlan, cifar10_steps
    from digit.recipes.report import write_summary
    from digit.recipes.runner import DONE_DIR, command_line, run_steps
    from digit.utils.outputs import claim_dir

    routes, seeds = list(dict.fromkeys(args.encoder)), list(dict.fromkeys(args.seeds))
    plan = RecipePlan(str(Path(args.data).resolve()), size=args.size, routes=tuple(routes), seeds=tuple(seeds),
                      seed=args.seed, fid_ref=args.fid_ref)  # fmt: skip
    steps = cifar10_steps(plan)
    if args.dry_run:
        for i, step in enumerate(steps, 1):
            print(f"[{i}/{len(steps)}] {step.name}: {step.what}\n    $ {command_line(step)}")
        return 0
    if args.summary_only:
        return _summarise_finished(args, plan, routes, seeds)
    claim_dir(args.out, kind="recipe", inputs=(args.data,), is_legacy=lambda d: (d / DONE_DIR).is_dir())
    print(f"digit recipe cifar10 ({args.size}, routes {' '.join(routes)}, seeds {' '.join(map(str, seeds))}): "
          f"{len(steps)} steps in {args.out}", flush=True)  # fmt: skip
    results = run_steps(steps, args.out, log=lambda m: print(m, flush=True))
    md = write_summary(args.out, results, size=args.size, routes=routes, seeds=seeds, baseline=args.baseline)
    print(md)
    return 0


def _summarise_finished(args: argparse.Namespace, plan, routes: list[str], seeds: list[int]) -> int:
    from digit.recipes.cifar10 import finished_seeds
    from digit.recipes.report import write_summary
    from digit.recipes.runner import DONE_DIR
    from digit.utils.outputs import read_marker

    root = Path(args.out)
    if (read_marker(root) or {}).get("kind") != "recipe" and not (root / DONE_DIR).is_dir():
        raise DigitError(f"--out {args.out} is not a digit recipe directory")
    results, ready = finished_seeds(plan, root)
    if not ready:
        raise DigitError(f"no seed has finished every step in {args.out} yet; nothing to summarise")
    print(write_summary(args.out, results, size=args.size, routes=routes, seeds=ready, baseline=args.baseline))
    left = [n for n in seeds if n not in ready]
    note = f"; not finished yet: {' '.join(map(str, left))}" if left else ""
    print(f"summarised seed(s) {' '.join(map(str, ready))}{note}")
    return 0


def _scenes_doc() -> str:
    from digit.recipes import scenes

    return scenes.__doc__ or ""


def run_scenes(args: argparse.Namespace) -> int:
    from digit.recipes.runner import command_line, run_steps
    from digit.recipes.scenes import scenes_steps, write_scenes_summary
    from digit.utils.outputs import claim_dir

    steps = scenes_steps(size=args.size, seed=args.seed)
    if args.dry_run:
        for i, step in enumerate(steps, 1):
            print(f"[{i}/{len(steps)}] {step.name}: {step.what}\n    $ {command_line(step)}")
        return 0
    claim_dir(args.out, kind="recipe")
    print(f"digit recipe scenes ({args.size}): {len(steps)} steps in {args.out}", flush=True)
    results = run_steps(steps, args.out, log=lambda m: print(m, flush=True))
    print(write_scenes_summary(args.out, results, size=args.size))
    return 0


def run_ship(args: argparse.Namespace) -> int:
    from digit.recipes.ship import ship_models
    from digit.utils.outputs import output_dir

    target = output_dir(args.out, kind="recipe ship", inputs=(args.recipe,), overwrite=args.overwrite)
    out = ship_models(args.recipe, target, route=args.route, seed=args.seed)
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"{f}  {f.stat().st_size / 2**20:.2f} MiB")
    return 0

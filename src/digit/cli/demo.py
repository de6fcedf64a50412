"""`digit demo`: class label -> pixels with the shipped CIFAR-10 reference models, the tokenizer at work, a report.

    digit demo                       # writes outputs/demo/{samples.png, tokenizer.png, report.md, report.html}
    digit demo --models DIR          # a folder made by `digit recipe ship`

Offline, on CPU, in about a minute. Without the shipped models (e.g. a trimmed install) it says so and first trains
them with the CIFAR-10 recipe at its small size (on --data, or on generated shapes when there is no CIFAR-10 archive).
"""

from __future__ import annotations

import argparse

from digit.cli.common import add_device_arg, existing_dir, existing_path, non_negative_float, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the main job end to end on the shipped reference models, with a report (start here)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--models", type=existing_dir, help="model folder from `digit recipe ship` (default: shipped)")
    p.add_argument(
        "--data", type=existing_path, help="CIFAR-10 archive or labelled folder, used only if models must be trained"
    )
    p.add_argument("--per-class", type=positive_int, default=8, help="samples per class in the grid")
    p.add_argument("--cfg-scale", type=non_negative_float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--top-k", type=int, default=100, help="stage-1 top-k (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from digit.cli.common import resolve_device
    from digit.demo import run_demo
    from digit.errors import DigitError
    from digit.utils.outputs import claim_dir

    if args.top_k < 0:
        raise DigitError(f"--top-k must be >= 0, got {args.top_k}")
    # a growing folder (a rerun reuses fallback models trained in it): ours or new, never a foreign one
    claim_dir(args.out, kind="demo", inputs=(args.models, args.data), is_legacy=lambda d: (d / "report.md").is_file())
    report = run_demo(
        args.out,
        args.models,
        data=str(args.data) if args.data else None,
        per_class=args.per_class,
        cfg_scale=args.cfg_scale,
        top_k=args.top_k,
        seed=args.seed,
        device=resolve_device(args.device),
        log=lambda m: print(m, flush=True),
    )
    print(f"report: {report}  (and {report.with_suffix('.html')})")
    return 0

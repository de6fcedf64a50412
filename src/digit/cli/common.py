"""Argument types and helpers shared by the subcommands: validation happens here, at the boundary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def existing_path(value: str) -> Path:
    p = Path(value).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"path does not exist: {value}")
    return p


def existing_dir(value: str) -> Path:
    p = existing_path(value)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"not a directory: {value}")
    return p


def positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not an integer: {value}") from e
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {value}")
    return v


def non_negative_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not an integer: {value}") from e
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {value}")
    return v


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a number: {value}") from e


def positive_float(value: str) -> float:
    v = _float(value)
    if not v > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be > 0: {value}")
    return v


def non_negative_float(value: str) -> float:
    v = _float(value)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {value}")
    return v


def unit_fraction(value: str) -> float:
    """A float in (0, 1]."""
    try:
        v = float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a number: {value}") from e
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: {value}")
    return v


def json_object(value: str) -> dict[str, Any]:
    try:
        v = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {value}") from e
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object: {value}")
    return v


def add_output_args(p: argparse.ArgumentParser, help: str) -> None:
    """``--out DIR`` and ``--overwrite`` for a command that writes a directory (rules: `digit.utils.outputs`)."""
    p.add_argument("--out", required=True, help=f"{help} (an existing non-empty folder is refused unless it is this "
                   "command's own earlier output, or --overwrite; never one holding or inside an input)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that this command did not write")


def add_text_encoder_args(p: Any, help: str) -> None:
    """``--text-encoder DIR|REPO_ID`` and ``--pretrained``, the same for tokenize, train, sample, generate and serve
    (``p``: a parser or an argument group; ``help`` says what the command uses the encoder for)."""
    p.add_argument("--text-encoder", metavar="DIR|REPO_ID", help=f"{help}: a local directory, or a Hugging Face "
                   "repository id such as google/flan-t5-xl (LlamaGen's) taken from the local hub cache")  # fmt: skip
    p.add_argument("--pretrained", action="store_true", help="let --text-encoder REPO_ID download from the Hugging "
                   "Face Hub when it is not cached (needs internet; configs, tokenizer and safetensors only)")  # fmt: skip


def text_encoder_dir(args: argparse.Namespace) -> Path | None:
    """``--text-encoder`` as a directory (`digit.data.text_features.resolve_text_encoder`; None when not given)."""
    from digit.data.text_features import resolve_text_encoder
    from digit.errors import DigitError

    if args.text_encoder is None:
        if args.pretrained:
            raise DigitError("--pretrained needs --text-encoder REPO_ID")
        return None
    return resolve_text_encoder(args.text_encoder, download=args.pretrained)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def resolve_device(name: str | None):
    import torch

    from digit.errors import DigitError

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise DigitError(f"unknown device {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DigitError(f"device {name!r} requested but CUDA is not available")
    return dev


def ema_decay(value: str) -> float:
    """An EMA decay in [0, 1) (0: off)."""
    v = _float(value)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): {value}")
    return v


# Flags of the one trainer, declared once for `train`, `vq train` and `encoder pretrain` (same names, same defaults).
TRAINER_FLAGS = ("--steps", "--grad-accum", "--ema", "--eval-every")  # the ones a command may leave out


def add_trainer_args(p: argparse.ArgumentParser, *, batch_size: int, omit: tuple[str, ...] = ()) -> None:
    """Register the trainer's flags on ``p``. ``batch_size`` is the command's default global batch (a recipe
    hyper-parameter, so it stays per command); ``omit`` drops flags the task has no use for (see ``TRAINER_FLAGS``)."""
    unknown = set(omit) - set(TRAINER_FLAGS)
    if unknown:
        raise ValueError(f"cannot omit {sorted(unknown)}: only {TRAINER_FLAGS}")
    g = p.add_argument_group("training loop (the same flags and defaults for train, vq train and encoder pretrain)")
    if "--steps" in omit:
        g.add_argument("--epochs", type=positive_float, required=True, help="total epochs (fractions allowed)")
    else:
        length = g.add_mutually_exclusive_group(required=True)
        length.add_argument("--steps", type=positive_int, help="total optimizer steps (also when resuming)")
        length.add_argument(
            "--epochs", type=positive_float, help="total epochs of drop-last batches (fractions allowed)"
        )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        help="GLOBAL batch, all ranks x accumulation (default %(default)s)",
    )
    if "--grad-accum" not in omit:
        g.add_argument(
            "--grad-accum", type=positive_int, default=1, help="micro-batches per step (default %(default)s)"
        )
    if "--ema" not in omit:
        g.add_argument(
            "--ema",
            type=ema_decay,
            default=0.0,
            help="EMA decay of the weights, exported instead of the raw ones (default %(default)s: off)",
        )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the init, data order and augmentations (default %(default)s)"
    )
    g.add_argument(
        "--save-every",
        type=non_negative_int,
        default=1000,
        help="checkpoint period in steps (default %(default)s; 0: only at the end)",
    )
    if "--eval-every" not in omit:
        g.add_argument(
            "--eval-every",
            type=non_negative_int,
            default=0,
            help="validation period in steps (default %(default)s: off)",
        )
    g.add_argument(
        "--log-every",
        type=positive_int,
        default=10,
        help="metrics.jsonl period in steps (default %(default)s; the last step always)",
    )
    g.add_argument(
        "--parallel",
        choices=["auto", "none", "ddp", "fsdp"],
        default="auto",
        help="data parallelism (default %(default)s: ddp under torchrun, none in one process)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="default %(default)s: bf16 autocast on CUDA, fp32 on CPU",
    )
    g.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="DataLoader worker processes (default %(default)s: load in the main process; alias --num-workers)",
    )
    # the name `encoder pretrain` used before the flags were shared: old command lines keep working
    g.add_argument(
        "--num-workers", dest="workers", type=non_negative_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")


def trainer_config(args: argparse.Namespace, **fixed: Any):
    """The ``TrainConfig`` of flags registered by ``add_trainer_args`` (``fixed`` sets what a command decides itself).

    Call it after ``init_distributed()``: ``--parallel auto`` becomes ddp under torchrun and none in one process; under
    torchrun it refuses ``--parallel none`` (every rank would train and write the same run on its own)."""
    from digit.errors import DigitError
    from digit.training.trainer import TrainConfig
    from digit.utils.distributed import get_dist_info

    dist = get_dist_info()
    parallel = ("ddp" if dist.enabled else "none") if args.parallel == "auto" else args.parallel
    if dist.enabled and parallel == "none":
        raise DigitError(f"running under torchrun with {dist.world_size} processes: pass --parallel ddp or fsdp")
    values = {
        "steps": getattr(args, "steps", None),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "grad_accum": getattr(args, "grad_accum", 1),
        "seed": args.seed,
        "ema": getattr(args, "ema", 0.0),
        "save_every": args.save_every,
        "eval_every": getattr(args, "eval_every", 0),
        "log_every": args.log_every,
        "parallel": parallel,
        "compile": args.compile,
        "precision": args.precision,
        "num_workers": args.workers,
        "progress": not args.no_progress,
    }
    return TrainConfig(**{**values, **fixed})


def resolve_rank_device(name: str | None, local_rank: int = 0):
    """``--device`` if given; otherwise this torchrun rank's GPU (cuda:LOCAL_RANK), or the CPU."""
    import torch

    if name or not torch.cuda.is_available():
        return resolve_device(name)
    return torch.device(f"cuda:{local_rank}")

"""The `digit` command. Each subcommand lives in its own module with ``register(subparsers)``.

Modules import heavy libraries (torch, timm, faiss) inside their run functions so that ``digit --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from digit import __version__
from digit.errors import DigitError
from digit.utils.artifacts import VERIFY_ENV

# Order = order in `digit --help`.
COMMAND_MODULES = [
    "demo",
    "tokenizer",
    "tokenize",
    "text_encoder",
    "stability",
    "train",
    "sample",
    "vq",
    "generate",
    "serve",
    "eval",
    "probe",
    "scenes",
    "encoder",
    "weights",
    "convert",
    "recipe",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digit",
        description="Autoregressive image generation and understanding over a stable, discriminative latent space.",
    )
    parser.add_argument("--version", action="version", version=f"digit {__version__}")
    parser.add_argument(
        "--no-verify-weights",
        action="store_true",
        help="skip the sha256 check of weights files on load (for very large files; same as DIGIT_VERIFY_WEIGHTS=0)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        mod_name = f"digit.cli.{name}"
        if importlib.util.find_spec(mod_name) is None:
            continue
        importlib.import_module(mod_name).register(sub)
    return parser


def _release_process_group(together: bool = False) -> None:
    """Destroy a torchrun process group the command left alive (any command, on success or error): a rank that exits
    with its gloo group alive can abort in teardown ("terminate called without an active exception"). ``together``
    (the command succeeded): first wait for the other ranks, so that no rank tears its group down while rank 0 still
    writes the last checkpoint; bounded, so a rank that failed cannot hang the others."""
    dist = sys.modules.get("torch.distributed")  # never imports torch for a command that did not
    if dist is not None and dist.is_available() and dist.is_initialized():
        if together and dist.get_world_size() > 1:
            from datetime import timedelta

            try:
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=timedelta(seconds=120))
                else:
                    dist.barrier()
            except Exception:  # a rank that failed: tear down regardless
                pass
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    saved_env = os.environ.get(VERIFY_ENV)
    if args.no_verify_weights:
        os.environ[VERIFY_ENV] = "0"
    succeeded = False
    try:
        result = args.func(args)
        succeeded = True
    except DigitError as e:
        print(f"digit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training run's TrainingInterrupted says where its checkpoint is
        print(f"digit {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    finally:
        _release_process_group(together=succeeded)
        if saved_env is None:
            os.environ.pop(VERIFY_ENV, None)
        else:
            os.environ[VERIFY_ENV] = saved_env
    return int(result or 0)

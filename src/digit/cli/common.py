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

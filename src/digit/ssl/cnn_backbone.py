"""A timm CNN as the DINO backbone: the final feature map's positions are the "patches", their mean the class token.

DINO's losses only need one vector per crop (and iBOT one per patch, which needs a mask token that a CNN cannot take
in its input, so iBOT is refused). ``forward_features`` is timm's uniform CNN API (for EfficientNet it includes the
1x1 head conv and its norm), so any crop size works: local crops need no patch-size rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from digit.errors import DigitError


class CNNBackbone(nn.Module):
    def __init__(self, model: nn.Module, mask_token: bool = False) -> None:
        super().__init__()
        if mask_token:
            raise DigitError("iBOT (--ibot-weight) masks patch embeddings, which a CNN does not have: use 0 for CNNs")
        if not hasattr(model, "forward_features") or not hasattr(model, "num_features"):
            raise DigitError(f"{type(model).__name__} is not a timm CNN with forward_features")
        self.vit = model  # named as ViTBackbone's, so checkpoints, FSDP units and the export share one prefix
        self.embed_dim: int = int(model.num_features)
        self.patch_size = 1  # no patch grid constrains the crop sizes
        self.mask_token = None

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (mean of the positions [B, D], positions [B, h*w, D])."""
        if mask is not None:
            raise DigitError("a CNN backbone takes no patch mask (iBOT)")
        fmap = self.vit.forward_features(images)  # [B, D, h, w]
        patches = fmap.flatten(2).transpose(1, 2)
        return patches.mean(1), patches


def make_backbone(model: nn.Module, mask_token: bool = False) -> nn.Module:
    """ViTBackbone for timm VisionTransformers, CNNBackbone for everything else timm builds."""
    from timm.models.vision_transformer import VisionTransformer

    from digit.ssl.dino import ViTBackbone

    if isinstance(model, VisionTransformer):
        return ViTBackbone(model, mask_token=mask_token)
    return CNNBackbone(model, mask_token=mask_token)

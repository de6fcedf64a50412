"""Convolutional encoder / decoder of the VQGAN family (taming, MAGE/MaskGIT, LlamaGen), one configurable pair.

The three originals share one design (taming-transformers' ``diffusionmodules/model.py``) and differ in switches that
:class:`digit.tokenizers.vq.VQConfig` exposes:

- ``layout="taming"``: ``encoder.down.{level}.block.{i}`` / ``.attn.{i}`` / ``.downsample``, ``mid.block_1`` /
  ``mid.attn_1`` / ``mid.block_2``, ``decoder.up.{level}`` indexed by resolution level (``up.0`` is full resolution).
  Used by taming (f16) and MAGE's port of the JAX MaskGIT VQGAN.
- ``layout="llamagen"``: ``encoder.conv_blocks.{level}.res.{i}`` / ``.attn.{i}``, ``mid.{0,1,2}``, and
  ``decoder.conv_blocks`` in *decoding* order (``conv_blocks.0`` is the lowest resolution), as in LlamaGen's
  ``tokenizer/tokenizer_image/vq_model.py``.
- MAGE quirks (DiGIT reference section 4): bias-free res-block convs and encoder ``conv_in``; the 1x1 shortcut is applied
  to the residual branch output (``nin_shortcut(h) + h``, so its weight is [out, out]); average-pool downsampling; a 1x1
  encoder ``conv_out``; two (not three) res blocks per decoder level; no attention.

Module names match the originals so released weights load with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from digit.tokenizers.vq import VQConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # GroupNorm(32, eps 1e-6) in all three originals; ``groups`` is smaller only in CPU-sized presets.
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        groups: int,
        bias: bool = True,
        shortcut_on_residual: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.shortcut_on_residual = shortcut_on_residual
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        if in_channels != out_channels:
            # MAGE applies the shortcut to h (shape [out, out]); taming/LlamaGen to x ([out, in]).
            nin_in = out_channels if shortcut_on_residual else in_channels
            self.nin_shortcut = nn.Conv2d(nin_in, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(h if self.shortcut_on_residual else x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out (taming's AttnBlock, through SDPA)."""

    def __init__(self, channels: int, *, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head of width C, softmax scale C^-0.5 as in the original bmm version
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            # asymmetric (0, 1, 0, 1) zero padding, as in taming
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: nn.ModuleList, attn: nn.ModuleList, layout: str) -> nn.Module:
    level = nn.Module()
    if layout == "taming":
        level.block = blocks
    else:
        level.res = blocks
    if len(attn):
        level.attn = attn
    return level


def _level_blocks(level: nn.Module) -> nn.ModuleList:
    return level.block if hasattr(level, "block") else level.res


def _mid(channels: int, cfg: VQConfig) -> nn.Module:
    def res() -> ResnetBlock:
        return ResnetBlock(
            channels,
            channels,
            groups=cfg.norm_groups,
            bias=cfg.conv_bias,
            shortcut_on_residual=cfg.shortcut_on_residual,
            dropout=cfg.dropout,
        )

    if cfg.layout == "llamagen":
        parts = [res(), AttnBlock(channels, groups=cfg.norm_groups), res()] if cfg.attention else [res(), res()]
        return nn.ModuleList(parts)
    mid = nn.Module()
    mid.block_1 = res()
    if cfg.attention:
        mid.attn_1 = AttnBlock(channels, groups=cfg.norm_groups)
    mid.block_2 = res()
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if isinstance(mid, nn.ModuleList):
        for m in mid:
            h = m(h)
        return h
    h = mid.block_1(h)
    if hasattr(mid, "attn_1"):
        h = mid.attn_1(h)
    return mid.block_2(h)


def _res_level(cfg: VQConfig, block_in: int, block_out: int, n_blocks: int, attention: bool) -> nn.Module:
    """One resolution level: ``n_blocks`` res blocks (block_in -> block_out), each followed by an attention block when
    ``attention`` and the config has attention, named the way ``cfg.layout`` names them."""
    blocks, attn = nn.ModuleList(), nn.ModuleList()
    for _ in range(n_blocks):
        blocks.append(
            ResnetBlock(
                block_in,
                block_out,
                groups=cfg.norm_groups,
                bias=cfg.conv_bias,
                shortcut_on_residual=cfg.shortcut_on_residual,
                dropout=cfg.dropout,
            )
        )
        block_in = block_out
        if cfg.attention and attention:
            attn.append(AttnBlock(block_out, groups=cfg.norm_groups))
    return _level(blocks, attn, cfg.layout)


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    attn = getattr(level, "attn", None)
    for i, block in enumerate(_level_blocks(level)):
        h = block(h)
        if attn is not None:
            h = attn[i](h)
    return h


class Encoder(nn.Module):
    """Images [B, 3, S, S] (model range) -> latents [B, z_channels, S/f, S/f], f = 2^(len(ch_mult)-1)."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.layout = cfg.layout
        n_levels = len(cfg.ch_mult)
        # MAGE: encoder conv_in is bias-free together with the res-block convs
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=cfg.conv_bias)
        levels = nn.ModuleList()
        in_mult = (1, *cfg.ch_mult)
        block_in = cfg.ch
        for i_level in range(n_levels):
            block_in = cfg.ch * in_mult[i_level]
            block_out = cfg.ch * cfg.ch_mult[i_level]
            # attention at the lowest resolution only
            level = _res_level(cfg, block_in, block_out, cfg.num_res_blocks, attention=i_level == n_levels - 1)
            block_in = block_out if cfg.num_res_blocks else block_in
            if i_level != n_levels - 1:
                level.downsample = Downsample(block_in, with_conv=cfg.downsample == "conv")
            levels.append(level)
        if cfg.layout == "taming":
            self.down = levels
        else:
            self.conv_blocks = levels
        self.mid = _mid(block_in, cfg)
        self.norm_out = _norm(block_in, cfg.norm_groups)
        k = cfg.encoder_out_kernel
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, k, padding=k // 2)

    @property
    def levels(self) -> nn.ModuleList:
        return self.down if self.layout == "taming" else self.conv_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents [B, z_channels, h, w] -> images [B, 3, h*f, w*f] (model range)."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.layout = cfg.layout
        n_levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg)
        n_blocks = cfg.num_res_blocks + cfg.decoder_extra_blocks
        decode_order = []  # lowest resolution first
        for i_level in reversed(range(n_levels)):
            block_out = cfg.ch * cfg.ch_mult[i_level]
            level = _res_level(cfg, block_in, block_out, n_blocks, attention=i_level == n_levels - 1)
            block_in = block_out if n_blocks else block_in
            if i_level != 0:
                level.upsample = Upsample(block_in)
            decode_order.append(level)
        if cfg.layout == "taming":
            # taming indexes ``up`` by resolution level (up.0 = full resolution) and runs it in reverse
            self.up = nn.ModuleList(reversed(decode_order))
        else:
            self.conv_blocks = nn.ModuleList(decode_order)
        self.norm_out = _norm(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    @property
    def decode_order(self) -> list[nn.Module]:
        return list(reversed(self.up)) if self.layout == "taming" else list(self.conv_blocks)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in self.decode_order:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

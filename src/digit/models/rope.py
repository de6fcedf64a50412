"""2D rotary position embedding with LlamaGen's exact conventions.

Source: FoundationVision/LlamaGen `autoregressive/models/gpt.py` (`precompute_freqs_cis_2d`, `apply_rotary_emb`):
- each axis uses head_dim/4 frequencies ``1 / base ** (arange(0, D/2, 2)[: D/4] / (D/2))`` (D = head_dim);
- the first half of a head's rotation pairs turns with the row index, the second half with the column index;
- pairs are adjacent, interleaved elements ``(x[2m], x[2m + 1])`` (Meta's Llama layout, not HF's rotate_half);
- everything is computed in float32;
- condition positions get an all-zero table (cos = 0 AND sin = 0), which zeroes q and k there (not an identity
  rotation: the released checkpoints were trained this way).

A table is a float32 tensor ``[L, head_dim // 2, 2]`` holding (cos, sin) per position and pair.
"""

from __future__ import annotations

import torch


def axis_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """The head_dim // 4 frequencies used on each axis, float32 ``[head_dim // 4]``."""
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32)[: half // 2] / half))


def grid_table(h: int, w: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(cos, sin) for an h x w grid in raster order: ``[h * w, head_dim // 2, 2]``, float32."""
    freqs = axis_frequencies(head_dim, base)  # [F], F = head_dim // 4
    rows = torch.arange(h, dtype=torch.float32)[:, None] * freqs  # [h, F]
    cols = torch.arange(w, dtype=torch.float32)[:, None] * freqs  # [w, F]
    angles = torch.cat(
        [rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1
    )  # [h, w, 2F]: row angle for the first half of the pairs, column angle for the second
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # [h, w, 2F, 2]
    if table.shape[2] != head_dim // 2:  # head_dim not a multiple of 4: the last pair does not rotate
        pad = torch.zeros(h, w, head_dim // 2 - table.shape[2], 2)
        pad[..., 0] = 1.0
        table = torch.cat([table, pad], dim=2)
    return table.flatten(0, 1)


def zero_table(n: int, head_dim: int) -> torch.Tensor:
    """The all-zero table LlamaGen uses at condition positions: q and k become exactly 0 there."""
    return torch.zeros(n, head_dim // 2, 2)


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` [B, T, H, D] by ``table`` [T, D // 2, 2] (or per row [B, T, D // 2, 2]);
    computed in float32, returned in x.dtype."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, T, H, D/2, 2]
    t = table[None, :, None] if table.dim() == 3 else table[:, :, None]  # [1 or B, T, 1, D/2, 2]
    cos, sin = t[..., 0], t[..., 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(3).type_as(x)

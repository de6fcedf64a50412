"""2D RoPE against a direct formula (LlamaGen conventions), norm preservation, and zeroing at condition positions."""

import math

import pytest
import torch

from digit.models import GPT, build_config
from digit.models.rope import apply_rotary, axis_frequencies, grid_table, zero_table


def reference_rotate(x: torch.Tensor, h: int, w: int, base: float = 10000.0) -> torch.Tensor:
    """Element by element: pair m = (x[2m], x[2m+1]); m < D/4 turns by row * f_m, else by col * f_(m - D/4),
    with f_j = base^(-2j / (D/2)) (LlamaGen precompute_freqs_cis_2d)."""
    B, T, H, D = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    quarter = D // 4
    for t in range(T):
        row, col = divmod(t, w)
        for m in range(D // 2):
            j = m if m < quarter else m - quarter
            angle = (row if m < quarter else col) * base ** (-(2 * j) / (D / 2))
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[:, t, :, 2 * m].double(), x[:, t, :, 2 * m + 1].double()
            out[:, t, :, 2 * m] = a * c - b * s
            out[:, t, :, 2 * m + 1] = b * c + a * s
    return out


@pytest.mark.parametrize("h,w,D", [(4, 4, 16), (3, 5, 8), (2, 2, 100)])
def test_rope_matches_direct_formula(h, w, D):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, h * w, 3, D, generator=g)
    got = apply_rotary(x, grid_table(h, w, D))
    want = reference_rotate(x, h, w)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_frequencies_per_axis():
    f = axis_frequencies(64)
    assert f.shape == (16,)  # head_dim / 4 per axis
    torch.testing.assert_close(f, torch.tensor([10000.0 ** (-j / 16) for j in range(16)]))
    assert axis_frequencies(100).shape == (25,)  # gpt-3b head_dim 100


def test_rope_preserves_norms_at_grid_positions():
    x = torch.randn(2, 16, 4, 32, generator=torch.Generator().manual_seed(1))
    y = apply_rotary(x, grid_table(4, 4, 32))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # position 0 (row 0, col 0) is the identity
    torch.testing.assert_close(y[:, 0], x[:, 0])


def test_rope_row_and_column_halves():
    D = 16
    t = grid_table(3, 3, D)  # [9, 8, 2]
    angles = torch.atan2(t[..., 1], t[..., 0])
    # position (1, 2) = index 5: first half of pairs rotate by row 1, second by column 2
    f = axis_frequencies(D)
    torch.testing.assert_close(angles[5, :4], 1 * f)
    torch.testing.assert_close(angles[5, 4:], 2 * f)  # all angles < pi here, so atan2 does not wrap


def test_zero_table_zeroes_q_and_k():
    x = torch.randn(1, 2, 2, 8)
    assert apply_rotary(x, zero_table(2, 8)).abs().max() == 0


def test_model_table_zero_at_condition_and_q_k_vanish_there():
    model = GPT(build_config("tiny", cond="class", num_classes=3)).eval()
    C = model.config.cond_len
    assert model.rope.shape == (C + 16, model.config.head_dim // 2, 2)
    assert model.rope[:C].abs().max() == 0
    torch.testing.assert_close(model.rope[C:], grid_table(4, 4, model.config.head_dim))
    # the rotated q and k of the class position are exactly zero inside the first attention layer
    seen = {}
    attn = model.blocks[0].attn

    def spy(module, inputs, qkv):  # the fused projection's output, rotated as the attention rotates it
        B, T, _ = qkv.shape
        q, k, _ = qkv.view(B, T, 3, attn.n_heads, attn.head_dim).unbind(2)
        seen["q"] = apply_rotary(q, model.rope[:T])
        seen["k"] = apply_rotary(k, model.rope[:T])

    attn.qkv.register_forward_hook(spy)
    model(torch.randint(0, 64, (2, 16)), torch.tensor([0, 2]))
    assert seen["q"][:, 0].abs().max() == 0 and seen["k"][:, 0].abs().max() == 0
    assert seen["q"][:, 1:].abs().amax(dim=-1).min() > 0  # grid positions are not zeroed


def test_prefix_rope_uses_prefix_grid_then_zero_start():
    cfg = build_config("tiny", cond="prefix", prefix_vocab_size=7, prefix_grid=(2, 3))
    model = GPT(cfg)
    D = cfg.head_dim
    torch.testing.assert_close(model.rope[:6], grid_table(2, 3, D))
    assert model.rope[6].abs().max() == 0
    torch.testing.assert_close(model.rope[7:], grid_table(4, 4, D))

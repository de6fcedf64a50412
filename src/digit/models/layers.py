"""Building blocks of the GPT: norms, MLPs, attention with a static KV cache, and the two block layouts.

Llama layout follows LlamaGen (`autoregressive/models/gpt.py`); fairseq layout follows fairseq's
`TransformerDecoderLayer` as DiGIT uses it (../shared/reference/digit-official.md section 2). Parameter names match
those repositories so released weights load without renaming (see `digit.models.gpt`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from digit.models.rope import apply_rotary


class RMSNorm(nn.Module):
    """LlamaGen's RMSNorm: normalise in float32, cast back, then scale (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases (LlamaGen `FeedForward`)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def swiglu_hidden(dim: int, multiple_of: int = 256) -> int:
    """LlamaGen's hidden size: int(2 * 4d / 3) rounded up to a multiple of ``multiple_of`` (768 -> 2048)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class KVCache(nn.Module):
    """Static cache [B, H, S, D] written at ``input_pos`` (gpt-fast); non-persistent so it never enters a state_dict."""

    def __init__(self, batch: int, heads: int, max_seq: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [B, H, T, D] for the positions input_pos [T]; in-place, so nothing is allocated per step
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class _Attention(nn.Module):
    """Shared attention core; subclasses own the projections (their names differ between layouts)."""

    def __init__(self, dim: int, n_heads: int, attn_dropout: float) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.attn_dropout = attn_dropout
        self.kv_cache: KVCache | None = None

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None,
        causal: bool,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x)  # each [B, T, H, D]
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if input_pos is not None:
            assert self.kv_cache is not None, "call setup_cache() before cached decoding"
            k, v = self.kv_cache.update(input_pos, k, v)
            if kv_len is None:
                # static shapes (torch.compile / CUDA graphs): the whole cache through a [T, S] boolean mask
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                # eager: a view of the kv_len filled entries; the queries are the last T of them (one token, or a
                # prefill from position 0), so the bottom-right causal mask is is_causal on T == kv_len
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            p = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        return self._out(y.transpose(1, 2).reshape(B, T, -1))


class LlamaAttention(_Attention):
    """Fused ``wqkv`` [3d, d] (q, k, v order) and ``wo``, no biases, RoPE on q and k (LlamaGen `Attention`)."""

    def __init__(self, dim: int, n_heads: int, attn_dropout: float = 0.0, resid_dropout: float = 0.0) -> None:
        super().__init__(dim, n_heads, attn_dropout)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def _qkv(self, x):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        return q, k, v

    def _out(self, y):
        return self.resid_dropout(self.wo(y))


class FairseqAttention(_Attention):
    """fairseq `MultiheadAttention` self-attention: separate q/k/v/out projections with biases, scale head_dim^-0.5."""

    def __init__(self, dim: int, n_heads: int, attn_dropout: float = 0.0) -> None:
        super().__init__(dim, n_heads, attn_dropout)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _qkv(self, x):
        B, T, _ = x.shape
        shape = (B, T, self.n_heads, self.head_dim)
        return self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)

    def _out(self, y):
        return self.out_proj(y)


class LlamaBlock(nn.Module):
    """Pre-norm: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h)) (LlamaGen `TransformerBlock`)."""

    def __init__(self, dim, n_heads, ffn_dim, eps, attn_dropout, resid_dropout, ffn_dropout) -> None:
        super().__init__()
        self.attention = LlamaAttention(dim, n_heads, attn_dropout, resid_dropout)
        self.feed_forward = SwiGLU(dim, ffn_dim, ffn_dropout)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x, rope, causal, input_pos=None, mask=None, kv_len=None):
        h = x + self.attention(self.attention_norm(x), rope, causal, input_pos, mask, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class FairseqBlock(nn.Module):
    """fairseq `TransformerDecoderLayer` without encoder attention.

    Post-norm (DiGIT stage 1, ``normalize_before=False``): x = LN(x + drop(attn(x))); x = LN(x + drop(fc2(gelu(fc1 x)))).
    Pre-norm (DiGIT stage 2, ``normalize_before=True``): x = x + drop(attn(LN x)); x = x + drop(fc2(gelu(fc1 LN x))).
    GELU is the exact erf form; LayerNorm eps 1e-5.
    """

    def __init__(self, dim, n_heads, ffn_dim, eps, attn_dropout, dropout, norm_first: bool) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = FairseqAttention(dim, n_heads, attn_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, rope, causal, input_pos=None, mask=None, kv_len=None):
        if self.norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), rope, causal, input_pos, mask, kv_len))
            return x + self.dropout(self.fc2(F.gelu(self.fc1(self.final_layer_norm(x)))))
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, rope, causal, input_pos, mask, kv_len)))
        return self.final_layer_norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))

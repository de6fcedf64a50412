"""Building blocks of the GPT: norms, MLPs, attention with a static KV cache, and the one transformer block.

One naming for every layout (LlamaGen's Llama and DiGIT's fairseq decoder): a block is ``attn_norm``, ``attn``
(``qkv`` fused q/k/v projection, ``proj`` output projection), ``mlp_norm``, ``mlp`` (``up``, ``down`` and, for SwiGLU,
``gate``). What differs between the layouts is behaviour, chosen by the config (norm type, MLP type, biases, pre- or
post-norm); the released checkpoints' own key names are mapped at the boundary by `digit.convert.keys`.
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


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``"rms"`` (LlamaGen) or ``"layer"`` (fairseq's LayerNorm with bias)."""
    return RMSNorm(dim, eps) if kind == "rms" else nn.LayerNorm(dim, eps=eps)


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x) (LlamaGen ``FeedForward``: gate = w1, up = w3, down = w2)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    """down(gelu(up x)) with the exact erf GELU (fairseq ``fc1`` / ``fc2``)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


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
        # k, v: [B, H, T, D] for the positions input_pos [T] (every row) or [B, T] (per row: rows at different
        # steps, continuous batching); in-place, so nothing is allocated per step
        if input_pos.dim() == 1:
            self.k_cache.index_copy_(2, input_pos, k)
            self.v_cache.index_copy_(2, input_pos, v)
        else:
            index = input_pos[:, None, :, None].expand_as(k)  # [B, H, T, D]
            self.k_cache.scatter_(2, index, k)
            self.v_cache.scatter_(2, index, v)
        return self.k_cache, self.v_cache


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row over every key given (a decode step): q [B, H, 1, D], k, v [B, H, S, D].

    Two batched matmuls: on the CPU, SDPA's blocked flash kernel costs more than the work for a single query
    (measured 1.4x slower at fp32 and 5-6x at bf16 for GPT-B's decode shapes; benchmarks/sample.py). The softmax runs
    in float32 whatever the cache dtype."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head self-attention: fused ``qkv`` [3d, d] (q, k, v order), ``proj`` [d, d], optional RoPE on q and k,
    SDPA (scale head_dim^-0.5, as both LlamaGen and fairseq's ``MultiheadAttention``)."""

    def __init__(self, dim: int, n_heads: int, bias: bool, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None,
        causal: bool,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Without ``input_pos``: a whole sequence (causal or bidirectional). With it: the cached path; the cache is
        read up to ``kv_len`` entries (None: all of it), under ``mask`` ([T, S] or broadcastable, S the entries read)
        or, when ``mask`` is None, under the bottom-right causal mask (the T queries are the last T entries read)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # each [B, T, H, D]
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if input_pos is not None:
            assert self.kv_cache is not None, "call setup_cache() before cached decoding"
            k, v = self.kv_cache.update(input_pos, k, v)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # views: only the filled entries are read
            if T == 1 and mask is None and q.device.type == "cpu":
                y = decode_attention(q, k, v)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        else:
            p = self.attn_dropout if self.training else 0.0
            # an explicit mask (text models: padded caption keys removed) carries the causal structure itself
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    """One transformer block.

    Pre-norm (LlamaGen, DiGIT stage 2): h = x + drop(attn(attn_norm x)); out = h + drop(mlp(mlp_norm h)).
    Post-norm (DiGIT stage 1, fairseq ``normalize_before=False``): h = attn_norm(x + drop(attn x));
    out = mlp_norm(h + drop(mlp h)).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        hidden: int,
        *,
        norm: str,
        mlp: str,
        bias: bool,
        norm_first: bool,
        eps: float,
        attn_dropout: float = 0.0,
        resid_dropout: float = 0.0,
        ffn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attn_norm = make_norm(norm, dim, eps)
        self.attn = Attention(dim, n_heads, bias, attn_dropout)
        self.mlp_norm = make_norm(norm, dim, eps)
        self.mlp = SwiGLU(dim, hidden, bias) if mlp == "swiglu" else GeluMLP(dim, hidden, bias)
        self.attn_dropout = nn.Dropout(resid_dropout)
        self.mlp_dropout = nn.Dropout(ffn_dropout)

    def forward(self, x, rope, causal, input_pos=None, mask=None, kv_len=None):
        if self.norm_first:
            h = x + self.attn_dropout(self.attn(self.attn_norm(x), rope, causal, input_pos, mask, kv_len))
            return h + self.mlp_dropout(self.mlp(self.mlp_norm(h)))
        h = self.attn_norm(x + self.attn_dropout(self.attn(x, rope, causal, input_pos, mask, kv_len)))
        return self.mlp_norm(h + self.mlp_dropout(self.mlp(h)))

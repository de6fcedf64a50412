"""The one image GPT: LlamaGen's Llama layout and DiGIT's fairseq layout behind one class.

Sequence layout (both layouts): ``[condition (C positions); image tokens]``. The condition is a learned start token
(or the vocabulary's BOS row), a class embedding, or a prefix of another vocabulary's tokens followed by a start
token (see `digit.models.conditions`). Autoregressive (``causal=True``): the input is ``[cond; tokens[:, :-1]]`` and
``logits[:, t]`` predicts ``tokens[:, t]``; the shift happens inside. MaskGIT-style (``causal=False``): the input is
``[cond; tokens]`` with masked positions holding ``mask_token_id == vocab_size`` and attention is bidirectional.

State-dict names: arch "llama" uses LlamaGen's (``tok_embeddings``, ``layers.{i}.attention.wqkv``, ``attention.wo``,
``feed_forward.w1/w2/w3``, ``attention_norm``, ``ffn_norm``, ``norm``, ``output``, ``cls_embedding.embedding_table``);
arch "fairseq" uses fairseq's ``TransformerDecoder`` names without the ``decoder.`` prefix (``embed_tokens``,
``embed_positions``, ``embed_positions_1``, ``layers.{i}.self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``,
``fc1``, ``fc2``, ``final_layer_norm``, ``layer_norm``, ``output_projection``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from digit.errors import DigitError
from digit.models.conditions import CONDITION_ATTR, build_condition
from digit.models.layers import FairseqBlock, KVCache, LlamaBlock, RMSNorm, swiglu_hidden
from digit.models.rope import grid_table, zero_table

ARCHS = ("llama", "fairseq")
CONDS = tuple(CONDITION_ATTR)
FAIRSEQ_POS_OFFSET = 2  # fairseq LearnedPositionalEmbedding: padding_idx 1, first real position is row 2


@dataclass(kw_only=True)
class GPTConfig:
    """Everything needed to rebuild a GPT; saved as ``config.json["model"]``."""

    vocab_size: int  # image-token vocabulary (output head rows)
    grid: tuple[int, int]  # (h, w) token grid, raster order
    arch: str = "llama"  # "llama" (LlamaGen) | "fairseq" (DiGIT)
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int | None = None  # None: llama int(8d/3) rounded up to multiple_of; fairseq 4d
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0  # llama only
    norm_first: bool | None = (
        None  # fairseq only: None = post-norm (DiGIT stage 1); True = pre-norm + final LN (stage 2)
    )
    max_positions: int | None = None  # fairseq only: learned table rows = max_positions + 2; None = just enough
    bos_id: int | None = None  # start token = this vocabulary row (fairseq's </s> = 2) instead of a learned vector
    cond: str = "none"  # "none" | "class" | "prefix"
    num_classes: int = 0
    class_dropout: float = 0.1  # label -> null class with this probability in training (CFG)
    prefix_vocab_size: int = 0
    prefix_grid: tuple[int, int] | None = None
    causal: bool = True  # False: MaskGIT-style bidirectional model with a mask token
    embed_dropout: float = 0.0  # on [cond; tokens] embeddings (LlamaGen token_dropout, fairseq dropout)
    resid_dropout: float = 0.0  # on the attention branch output
    ffn_dropout: float = 0.0  # on the MLP branch output
    attn_dropout: float = 0.0  # on attention probabilities

    def __post_init__(self) -> None:
        self.grid = tuple(int(g) for g in self.grid)
        if self.prefix_grid is not None:
            self.prefix_grid = tuple(int(g) for g in self.prefix_grid)
        if self.arch not in ARCHS:
            raise DigitError(f"unknown arch {self.arch!r} (choose from {', '.join(ARCHS)})")
        if self.cond not in CONDS:
            raise DigitError(f"unknown condition {self.cond!r} (choose from {', '.join(CONDS)})")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise DigitError(f"grid must be two positive sizes, got {self.grid}")
        if self.vocab_size < 2:
            raise DigitError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.dim % self.n_heads:
            raise DigitError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.arch == "llama" and self.head_dim % 2:
            raise DigitError(f"2D RoPE needs an even head_dim, got {self.head_dim}")
        if self.cond == "class" and self.num_classes < 1:
            raise DigitError("a class-conditional model needs num_classes >= 1")
        if self.cond == "prefix" and (self.prefix_vocab_size < 1 or not self.prefix_grid or min(self.prefix_grid) < 1):
            raise DigitError("a prefix-conditioned model needs prefix_vocab_size and prefix_grid")
        if self.bos_id is not None and not 0 <= self.bos_id < self.vocab_size:
            raise DigitError(f"bos_id {self.bos_id} outside the vocabulary [0, {self.vocab_size})")
        if not 0.0 <= self.class_dropout < 1.0:
            raise DigitError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        need = max(self.main_positions, self.prefix_len)
        if self.arch == "fairseq" and self.max_positions is not None and self.max_positions < need:
            raise DigitError(f"max_positions {self.max_positions} < the {need} positions the model needs")

    # ---- derived sizes
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def prefix_len(self) -> int:
        return self.prefix_grid[0] * self.prefix_grid[1] if self.cond == "prefix" else 0

    @property
    def cond_len(self) -> int:
        return self.prefix_len + 1  # prefix tokens (if any) then one start / class position

    @property
    def n_positions(self) -> int:
        return self.cond_len + self.seq_len  # covers both the causal and the NAR layout

    @property
    def main_positions(self) -> int:
        return 1 + self.seq_len  # start / class token then the image tokens (fairseq table without the prefix)

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        return swiglu_hidden(self.dim, self.multiple_of) if self.arch == "llama" else 4 * self.dim

    @property
    def position_rows(self) -> int:
        return (self.max_positions or self.main_positions) + FAIRSEQ_POS_OFFSET

    @property
    def prefix_position_rows(self) -> int:
        """Rows of fairseq's second table (``embed_positions_1``): as many as the first when max_positions is set."""
        return (self.max_positions or self.prefix_len) + FAIRSEQ_POS_OFFSET

    @property
    def is_norm_first(self) -> bool:
        return True if self.arch == "llama" else bool(self.norm_first)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["prefix_grid"] = list(self.prefix_grid) if self.prefix_grid else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DigitError(f"unknown GPT config keys: {', '.join(unknown)}")
        return cls(**d)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.mask_token_id = cfg.vocab_size
        n_emb = cfg.vocab_size + (0 if cfg.causal else 1)  # NAR: one extra row for the mask token
        llama = cfg.arch == "llama"
        # ---- embeddings
        if llama:
            self.tok_embeddings = nn.Embedding(n_emb, cfg.dim)
        else:
            self.embed_tokens = nn.Embedding(n_emb, cfg.dim)
            self.embed_positions = nn.Embedding(cfg.position_rows, cfg.dim)
            if cfg.cond == "prefix":  # DiGIT stage 2's second table for the semantic prefix
                self.embed_positions_1 = nn.Embedding(cfg.prefix_position_rows, cfg.dim)
        self.cond_attr = CONDITION_ATTR[cfg.cond]
        self.add_module(self.cond_attr, build_condition(cfg))
        self.embed_scale = 1.0 if llama else math.sqrt(cfg.dim)  # fairseq scales embeddings by sqrt(dim)
        self.dropout = nn.Dropout(cfg.embed_dropout)
        # ---- blocks
        if llama:
            block = lambda: LlamaBlock(  # noqa: E731
                cfg.dim, cfg.n_heads, cfg.hidden_dim, cfg.norm_eps, cfg.attn_dropout, cfg.resid_dropout, cfg.ffn_dropout
            )
        else:
            block = lambda: FairseqBlock(  # noqa: E731
                cfg.dim,
                cfg.n_heads,
                cfg.hidden_dim,
                cfg.norm_eps,
                cfg.attn_dropout,
                cfg.resid_dropout,
                cfg.is_norm_first,
            )
        self.layers = nn.ModuleList(block() for _ in range(cfg.n_layers))
        # ---- head (untied, no bias)
        if llama:
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        else:
            self.layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.is_norm_first else nn.Identity()
            self.output_projection = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # ---- non-persistent tables: never in a state_dict, rebuilt on every construction
        L = cfg.n_positions
        if llama:
            rope = [zero_table(cfg.cond_len, cfg.head_dim), grid_table(*cfg.grid, cfg.head_dim, cfg.rope_base)]
            if cfg.cond == "prefix":  # prefix tokens rotate on their own grid; the start token gets LlamaGen's zeros
                rope.insert(0, grid_table(*cfg.prefix_grid, cfg.head_dim, cfg.rope_base))
                rope[1] = zero_table(1, cfg.head_dim)
            self.register_buffer("rope", torch.cat(rope), persistent=False)  # [L, head_dim/2, 2] fp32
        else:
            self.rope = None
        self.register_buffer("causal_mask", torch.ones(L, L, dtype=torch.bool).tril(), persistent=False)
        self.cache_len = 0
        self.reset_parameters()

    # ---- initialisation
    def reset_parameters(self) -> None:
        if self.config.arch == "llama":
            # LlamaGen: N(0, 0.02) for every Linear / Embedding, zero biases, zero-initialised output head
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(self.output.weight)
            for p in self.condition.parameters(recurse=False):
                nn.init.normal_(p, std=0.02)
            return
        # fairseq: embeddings N(0, dim^-0.5), xavier-uniform projections with zero biases, head N(0, dim^-0.5)
        std = self.config.dim**-0.5
        for name, m in self.named_modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.Linear):
                gain = 1 / math.sqrt(2) if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") else 1.0
                nn.init.xavier_uniform_(m.weight, gain=gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.output_projection.weight, std=std)
        for p in self.condition.parameters(recurse=False):
            nn.init.normal_(p, std=std)

    # ---- small helpers
    @property
    def condition(self) -> nn.Module:
        return getattr(self, self.cond_attr)

    @property
    def head(self) -> nn.Linear:
        return self.output if self.config.arch == "llama" else self.output_projection

    def tok_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self.tok_embeddings if self.config.arch == "llama" else self.embed_tokens)(tokens)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) if self.config.arch == "llama" else self.layer_norm(h)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_cond(self, cond: torch.Tensor | None, batch: int) -> None:
        cfg = self.config
        if cfg.cond == "class" and (cond is None or cond.shape != (batch,)):
            raise DigitError(
                f"a class-conditional model needs labels [{batch}], got {None if cond is None else tuple(cond.shape)}"
            )
        if cfg.cond == "prefix" and (cond is None or cond.shape != (batch, cfg.prefix_len)):
            shape = None if cond is None else tuple(cond.shape)
            raise DigitError(f"a prefix-conditioned model needs prefix tokens [{batch}, {cfg.prefix_len}], got {shape}")

    def embed_condition(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Raw (unscaled, position-free) condition embeddings [B, C, dim]."""
        self._check_cond(cond, batch)
        return self.condition(cond, batch, self.tok_embed, self.causal_mask.device)

    def _embed(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Scale, add learned positions (fairseq) and apply embedding dropout to raw embeddings at ``input_pos``."""
        cfg = self.config
        if cfg.arch == "fairseq":
            x = x * self.embed_scale
            P = cfg.prefix_len
            if P:
                main = self.embed_positions((input_pos - P).clamp(min=0) + FAIRSEQ_POS_OFFSET)
                pre = self.embed_positions_1(input_pos.clamp(max=P - 1) + FAIRSEQ_POS_OFFSET)
                x = x + torch.where((input_pos < P)[:, None], pre, main)
            else:
                x = x + self.embed_positions(input_pos + FAIRSEQ_POS_OFFSET)
        return self.dropout(x)

    def _sequence(self, tokens: torch.Tensor, cond: torch.Tensor | None, shift: bool) -> torch.Tensor:
        B, T = tokens.shape
        if T != self.config.seq_len:
            raise DigitError(f"expected {self.config.seq_len} tokens per sample (grid {self.config.grid}), got {T}")
        if self.training:
            cond = self.condition.drop(cond) if cond is not None else cond
        c = self.embed_condition(cond, B)
        x = torch.cat([c, self.tok_embed(tokens[:, :-1] if shift else tokens)], dim=1)
        return self._embed(x, torch.arange(x.shape[1], device=x.device))

    def _blocks(self, x, input_pos=None, collect: list | None = None, kv_len: int | None = None) -> torch.Tensor:
        cfg = self.config
        mask = None
        if input_pos is None:
            rope = self.rope[: x.shape[1]] if self.rope is not None else None
        else:
            rope = self.rope[input_pos] if self.rope is not None else None
            if kv_len is not None and x.shape[1] not in (1, kv_len):
                kv_len = None  # a chunk in the middle of the sequence needs the explicit mask
            if kv_len is None:
                mask = self.causal_mask[input_pos, : self.cache_len]  # [T, S] for the static cache
        for layer in self.layers:
            x = layer(x, rope, cfg.causal, input_pos, mask, kv_len)
            if collect is not None:
                collect.append(x)
        return self.final_norm(x)

    # ---- training / scoring
    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] long, cond None | labels [B] | prefix [B, P] -> logits [B, T, vocab_size] float32."""
        cfg = self.config
        x = self._sequence(tokens, cond, shift=cfg.causal)
        h = self._blocks(x)
        start = cfg.cond_len - 1 if cfg.causal else cfg.cond_len
        return self.head(h[:, start : start + cfg.seq_len]).float()

    def hidden_states(self, tokens: torch.Tensor, cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[embedding output, block 1, ..., block n] over ``[cond; tokens]`` (all T tokens, no shift): n_layers + 1
        tensors [B, C + T, dim]. As in HF transformers, the last entry has the final norm applied (the features the
        head reads); for post-norm fairseq there is no final norm and it is the last block's output."""
        x = self._sequence(tokens, cond, shift=False)
        states = [x]
        h = self._blocks(x, collect=states)
        states[-1] = h
        return states

    # ---- cached decoding (used by digit.sampling.generate)
    def setup_cache(self, batch: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate the static KV cache once for ``batch`` rows; reused until the batch size changes."""
        cfg = self.config
        if not cfg.causal:
            raise DigitError("a bidirectional (causal=False) model decodes without a KV cache")
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        length = cfg.cond_len + cfg.seq_len - 1  # the last token is never fed back
        first = self.layers[0].attention if cfg.arch == "llama" else self.layers[0].self_attn
        cache = first.kv_cache
        k = cache.k_cache if cache is not None else None
        if k is not None and k.shape[0] == batch and k.dtype == dtype and k.device == torch.device(device):
            return
        for layer in self.layers:
            attn = layer.attention if cfg.arch == "llama" else layer.self_attn
            attn.kv_cache = KVCache(batch, cfg.n_heads, length, cfg.head_dim, dtype, device)
        self.cache_len = length

    def clear_cache(self) -> None:
        for layer in self.layers:
            (layer.attention if self.config.arch == "llama" else layer.self_attn).kv_cache = None
        self.cache_len = 0

    def prefill(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Run the condition positions through the cache; logits [B, vocab] for the first image token."""
        c = self.embed_condition(cond, batch)
        pos = torch.arange(c.shape[1], device=c.device)
        h = self._blocks(self._embed(c, pos), pos, kv_len=c.shape[1])
        return self.head(h[:, -1]).float()

    def decode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """Feed tokens [B, 1] at sequence position ``input_pos`` [1]; logits [B, vocab] for the next token.

        ``kv_len`` (= position + 1, a Python int) attends to that many cache entries only (faster in eager mode);
        None attends to the whole static cache through a mask (fixed shapes for torch.compile / CUDA graphs)."""
        h = self._blocks(self._embed(self.tok_embed(tokens), input_pos), input_pos, kv_len=kv_len)
        return self.head(h[:, -1]).float()

    @torch.inference_mode()
    def generate(self, cond: torch.Tensor | None = None, n: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Sample token grids [B, h, w]; keyword arguments as `digit.sampling.generate.generate`."""
        from digit.sampling.generate import generate

        return generate(self, cond=cond, n=n, **kwargs)

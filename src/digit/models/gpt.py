"""The one image GPT. LlamaGen's Llama layout and DiGIT's fairseq layout are two settings of its config.

Sequence layout: ``[condition (C positions); image tokens]``. The condition is a learned start token (or the
vocabulary's BOS row), a class embedding, a prefix of another vocabulary's tokens followed by a start token, or
projected caption features (see `digit.models.conditions`). A text model masks the padded caption positions as keys
for every query except themselves (LlamaGen's t2i mask); the cached path keeps that mask from ``prefill`` on. Autoregressive (``causal=True``): the input is ``[cond; tokens[:, :-1]]`` and
``logits[:, t]`` predicts ``tokens[:, t]``; the shift happens inside. MaskGIT-style (``causal=False``): the input is
``[cond; tokens]`` with masked positions holding ``mask_token_id == vocab_size`` and attention is bidirectional.

Module names (one scheme whatever the layout): ``token_embed``, ``pos_embed`` / ``prefix_pos_embed`` (learned
positions), ``condition.{start,table}``, ``blocks.{i}.{attn_norm,attn.qkv,attn.proj,mlp_norm,mlp.{gate,up,down}}``,
``final_norm``, ``head``. The released checkpoints' names (LlamaGen's ``tok_embeddings``, ``layers.{i}.attention.wqkv``,
...; fairseq's ``embed_tokens``, ``self_attn.q_proj``, ...) are mapped at the boundary by `digit.convert.keys`, which
also reads run directories written before this naming.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from digit.errors import DigitError
from digit.models.conditions import Caption, build_condition
from digit.models.gpt_config import ARCHS, CONDS, FAIRSEQ_POS_OFFSET, GPTConfig
from digit.models.layers import Block, KVCache, make_norm
from digit.models.rope import grid_table, zero_table

__all__ = ["ARCHS", "CONDS", "GPT", "GPTConfig"]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.mask_token_id = cfg.vocab_size
        # ---- embeddings
        self.token_embed = nn.Embedding(cfg.vocab_size + (0 if cfg.causal else 1), cfg.dim)  # NAR: + the mask row
        self.condition = build_condition(cfg)
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.position_rows, cfg.dim)
            if cfg.cond == "prefix":  # DiGIT stage 2's second table for the semantic prefix
                self.prefix_pos_embed = nn.Embedding(cfg.prefix_position_rows, cfg.dim)
        self.embed_scale = math.sqrt(cfg.dim) if cfg.scale_embeddings else 1.0
        self.dropout = nn.Dropout(cfg.embed_dropout)
        # ---- blocks and head (untied, no bias)
        self.blocks = nn.ModuleList(
            Block(
                cfg.dim,
                cfg.n_heads,
                cfg.hidden_dim,
                norm=cfg.norm,
                mlp=cfg.mlp,
                bias=cfg.bias,
                norm_first=cfg.norm_first,
                eps=cfg.norm_eps,
                attn_dropout=cfg.attn_dropout,
                resid_dropout=cfg.resid_dropout,
                ffn_dropout=cfg.ffn_dropout,
            )  # fmt: skip
            for _ in range(cfg.n_layers)
        )
        self.final_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if cfg.norm_first else nn.Identity()
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # ---- non-persistent tables: never in a state_dict, rebuilt on every construction
        L = cfg.n_positions
        if cfg.positions == "rope2d":
            rope = [zero_table(cfg.cond_len, cfg.head_dim), grid_table(*cfg.grid, cfg.head_dim, cfg.rope_base)]
            if cfg.cond == "prefix":  # prefix tokens rotate on their own grid; the start token gets LlamaGen's zeros
                rope.insert(0, grid_table(*cfg.prefix_grid, cfg.head_dim, cfg.rope_base))
                rope[1] = zero_table(1, cfg.head_dim)
            self.register_buffer("rope", torch.cat(rope), persistent=False)  # [L, head_dim/2, 2] fp32
        else:
            self.rope = None
        self.register_buffer("causal_mask", torch.ones(L, L, dtype=torch.bool).tril(), persistent=False)
        self.cache_len = 0
        self.key_valid: torch.Tensor | None = None  # text: [rows, cache_len] keys readable (set by prefill)
        self.reset_parameters()

    # ---- initialisation
    def reset_parameters(self) -> None:
        if self.config.init == "llamagen":
            # LlamaGen: N(0, 0.02) for every Linear / Embedding, zero biases, zero-initialised output head
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
            nn.init.zeros_(self.head.weight)
            for p in self.condition.parameters(recurse=False):
                nn.init.normal_(p, std=0.02)
            if hasattr(self.condition, "reset_null"):
                self.condition.reset_null()
            return
        # fairseq: embeddings N(0, dim^-0.5), xavier-uniform projections with zero biases (q, k and v each with gain
        # 1/sqrt(2), as fairseq's MultiheadAttention initialises its separate projections), head N(0, dim^-0.5)
        std = self.config.dim**-0.5
        for name, m in self.named_modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.Linear):
                if name.endswith("attn.qkv"):
                    for part in m.weight.data.chunk(3):
                        nn.init.xavier_uniform_(part, gain=1 / math.sqrt(2))
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, std=std)
        for p in self.condition.parameters(recurse=False):
            nn.init.normal_(p, std=std)
        if hasattr(self.condition, "reset_null"):
            self.condition.reset_null()

    # ---- small helpers
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
        if cfg.cond == "text":
            want = (batch, cfg.caption_len, cfg.caption_dim)
            ok = isinstance(cond, Caption) and tuple(cond.features.shape) == want
            if not ok or tuple(cond.mask.shape) != want[:2] or cond.mask.dtype != torch.bool:
                raise DigitError(
                    f"a text model needs a Caption: features {list(want)} and a bool mask {list(want[:2])}"
                )

    def _key_valid(self, cond, length: int) -> torch.Tensor | None:
        """Text: which of ``length`` sequence positions may be read as keys [B, length] (the caption mask, then the
        image positions); None for the other conditions."""
        if self.config.cond != "text":
            return None
        m = cond.mask
        return torch.cat([m, m.new_ones(m.shape[0], length - m.shape[1])], dim=1)

    def _key_mask(self, key_valid: torch.Tensor, pos: torch.Tensor, S: int) -> torch.Tensor:
        """The attention mask over ``S`` keys for queries at ``pos`` ([T] or per row [B, T]): causal, padded caption
        keys removed, each query's own position kept (LlamaGen adds the identity) -> [B, 1, T, S] bool."""
        base = self.causal_mask[pos, :S]
        own = pos[..., None] == torch.arange(S, device=pos.device)
        if pos.dim() == 2:
            base, own = base[:, None], own[:, None]
        return (base & key_valid[:, None, None, :S]) | own

    def embed_condition(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Raw (unscaled, position-free) condition embeddings [B, C, dim]."""
        self._check_cond(cond, batch)
        return self.condition(cond, batch, self.token_embed, self.causal_mask.device)

    def _embed(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Scale, add learned positions and apply embedding dropout to raw embeddings at ``input_pos``."""
        x = x * self.embed_scale if self.embed_scale != 1.0 else x
        if self.config.positions == "learned":
            P = self.config.prefix_len
            if P:
                main = self.pos_embed((input_pos - P).clamp(min=0) + FAIRSEQ_POS_OFFSET)
                pre = self.prefix_pos_embed(input_pos.clamp(max=P - 1) + FAIRSEQ_POS_OFFSET)
                x = x + torch.where((input_pos < P)[:, None], pre, main)
            else:
                x = x + self.pos_embed(input_pos + FAIRSEQ_POS_OFFSET)
        return self.dropout(x)

    def _sequence(self, tokens: torch.Tensor, cond, shift: bool) -> torch.Tensor:
        B, T = tokens.shape
        if T != self.config.seq_len:
            raise DigitError(f"expected {self.config.seq_len} tokens per sample (grid {self.config.grid}), got {T}")
        if self.training:
            cond = self.condition.drop(cond) if cond is not None else cond
        c = self.embed_condition(cond, B)
        x = torch.cat([c, self.token_embed(tokens[:, :-1] if shift else tokens)], dim=1)
        return self._embed(x, torch.arange(x.shape[1], device=x.device))

    def _blocks(self, x, input_pos=None, collect: list | None = None, kv_len: int | None = None,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The blocks and the final norm. Cached path (``input_pos`` given): ``kv_len`` cache entries are read, the
        queries being the last of them (decode: kv_len = position + 1; prefill from 0: kv_len = T); a chunk elsewhere
        reads them under the causal mask; ``kv_len=None`` reads the whole static cache through the mask.
        ``key_valid`` [B, S] (text models): keys that may be read; the mask is then always explicit."""
        mask = None
        if input_pos is None:
            rope = self.rope[: x.shape[1]] if self.rope is not None else None
            if key_valid is not None:
                mask = self._key_mask(key_valid, torch.arange(x.shape[1], device=x.device), x.shape[1])
        elif key_valid is not None:
            rope = self.rope[input_pos] if self.rope is not None else None
            mask = self._key_mask(key_valid, input_pos, kv_len if kv_len is not None else self.cache_len)
        else:
            rope = self.rope[input_pos] if self.rope is not None else None
            T = x.shape[1]
            if input_pos.dim() == 2:  # per-row positions [B, T] (continuous batching): [B, 1, T, S] over the cache
                kv_len, mask = None, self.causal_mask[input_pos, : self.cache_len][:, None]
            elif kv_len is None:
                mask = self.causal_mask[input_pos, : self.cache_len]  # [T, S]: fixed shapes for compile / graphs
            elif T not in (1, kv_len):
                mask = self.causal_mask[input_pos, :kv_len]
        for block in self.blocks:
            x = block(x, rope, self.config.causal, input_pos, mask, kv_len)
            if collect is not None:
                collect.append(x)
        return self.final_norm(x)

    # ---- training / scoring
    def forward(self, tokens: torch.Tensor, cond=None) -> torch.Tensor:
        """tokens [B, T] long, cond None | labels [B] | prefix [B, P] | Caption -> logits [B, T, vocab_size] float32."""
        cfg = self.config
        x = self._sequence(tokens, cond, shift=cfg.causal)
        h = self._blocks(x, key_valid=self._key_valid(cond, x.shape[1]))
        start = cfg.cond_len - 1 if cfg.causal else cfg.cond_len
        return self.head(h[:, start : start + cfg.seq_len]).float()

    def hidden_states(self, tokens: torch.Tensor, cond=None) -> list[torch.Tensor]:
        """[embedding output, block 1, ..., block n] over ``[cond; tokens]`` (all T tokens, no shift): n_layers + 1
        tensors [B, C + T, dim]. As in HF transformers, the last entry has the final norm applied (the features the
        head reads); for a post-norm model there is no final norm and it is the last block's output."""
        x = self._sequence(tokens, cond, shift=False)
        states = [x]
        h = self._blocks(x, collect=states, key_valid=self._key_valid(cond, x.shape[1]))
        states[-1] = h
        return states

    # ---- cached decoding (the interface digit.sampling.generate.CachedDecoder states)
    def setup_cache(self, batch: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Allocate the static KV cache once for ``batch`` rows; reused until the batch size changes."""
        cfg = self.config
        if not cfg.causal:
            raise DigitError("a bidirectional (causal=False) model decodes without a KV cache")
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        length = cfg.cond_len + cfg.seq_len - 1  # the last token is never fed back
        cache = self.blocks[0].attn.kv_cache
        k = cache.k_cache if cache is not None else None
        if k is not None and k.shape[0] == batch and k.dtype == dtype and k.device == torch.device(device):
            return
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch, cfg.n_heads, length, cfg.head_dim, dtype, device)
        self.cache_len = length

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None
        self.cache_len = 0
        self.key_valid = None

    def prefill(self, cond, batch: int) -> torch.Tensor:
        """Run the condition positions through the cache; logits [B, vocab] for the first image token. A text model
        keeps the caption's key mask for the decode steps that follow."""
        c = self.embed_condition(cond, batch)
        pos = torch.arange(c.shape[1], device=c.device)
        self.key_valid = self._key_valid(cond, self.cache_len)
        h = self._blocks(self._embed(c, pos), pos, kv_len=c.shape[1], key_valid=self.key_valid)
        return self.head(h[:, -1]).float()

    def decode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """Feed tokens [B, 1] at sequence position ``input_pos`` [1], or per row [B, 1] (rows at different steps:
        continuous batching, always through the mask); logits [B, vocab] for the next token.

        Attention reads only the filled cache entries (``kv_len`` = position + 1, a Python int): given by the caller,
        or, for positions on the CPU in eager mode, read from ``input_pos`` (free there). Under torch.compile, or on an
        accelerator without ``kv_len``, it reads the whole static cache through a mask (fixed shapes for CUDA graphs;
        reading a device position would cost a host sync per step)."""
        eager_cpu = input_pos.device.type == "cpu" and not torch.compiler.is_compiling()
        if kv_len is None and input_pos.dim() == 1 and eager_cpu:  # per-row positions [B, 1] read through the mask
            kv_len = int(input_pos[-1]) + 1
        x = self._embed(self.token_embed(tokens), input_pos)
        h = self._blocks(x, input_pos, kv_len=kv_len, key_valid=self.key_valid)
        return self.head(h[:, -1]).float()

    def decode_block(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B, T] at consecutive sequence positions ``input_pos`` [T] after a filled cache; logits
        [B, T, vocab] for the token after each of them (speculative verification: `digit.sampling.jacobi`).

        Causal inside the block, everything before it from the cache; stale entries after it (left by an earlier,
        longer block) are not read (positions on the CPU in eager mode: only the entries up to the block's end) or
        are masked out (otherwise: the whole static cache through the mask, as `decode_step`)."""
        kv_len = None
        if input_pos.device.type == "cpu" and not torch.compiler.is_compiling():
            kv_len = int(input_pos[-1]) + 1
        x = self._embed(self.token_embed(tokens), input_pos)
        h = self._blocks(x, input_pos, kv_len=kv_len, key_valid=self.key_valid)
        return self.head(h).float()

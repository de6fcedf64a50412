"""Condition embedders: what the GPT sees before the first image token.

Each embedder turns a condition into ``[B, C, dim]`` embeddings occupying sequence positions 0..C-1; the first image
token is predicted from position C-1. A new condition kind is one more class here with the same four members
(``length``, ``forward``, ``null``, ``drop``) and one more entry in ``build_condition``.

Every embedder sits at ``GPT.condition``: ``condition.start`` (a learned start vector), ``condition.table`` (class
or prefix-token embeddings), ``condition.mlp.{up,down}`` and ``condition.null_caption`` (text). LlamaGen's
``cls_embedding.embedding_table`` / ``cls_embedding.cap_proj.{fc1,fc2}`` / ``cls_embedding.uncond_embedding`` and
fairseq's BOS / class rows are mapped onto these names by `digit.convert.keys`.

Text (LlamaGen's t2i ``CaptionEmbedder``): a :class:`Caption` (text-encoder features [B, L, D_t] and a validity mask
[B, L]) is projected by a two-layer MLP into L condition positions; there is no start token, the last caption position
predicts the first image token (LlamaGen ``cls_token_num = 120``). Padded caption positions are masked out as keys
for every query (each still attends to itself, so its row stays finite): see ``GPT``. LlamaGen's sampler left-pads
(`left_pad_captions`) so the last position is always a real token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from digit.errors import DigitError

TokenEmbed = Callable[[torch.Tensor], torch.Tensor]


class _StartToken(nn.Module):
    """A start token: the vocabulary's BOS row when ``bos_id`` is set (fairseq's ``</s>``), else a learned vector."""

    def __init__(self, dim: int, bos_id: int | None) -> None:
        super().__init__()
        self.bos_id = bos_id
        if bos_id is None:
            self.start = nn.Parameter(torch.zeros(1, 1, dim))

    def embed_start(self, batch: int, tok_embed: TokenEmbed, device) -> torch.Tensor:
        if self.bos_id is not None:
            return tok_embed(torch.full((batch, 1), self.bos_id, dtype=torch.long, device=device))
        return self.start.expand(batch, -1, -1)


class NoCondition(_StartToken):
    """Unconditional: one start token at position 0."""

    kind = "none"
    length = 1

    def forward(self, cond: torch.Tensor | None, batch: int, tok_embed: TokenEmbed, device) -> torch.Tensor:
        return self.embed_start(batch, tok_embed, device)

    def null(self, cond):
        raise DigitError("classifier-free guidance needs a class-conditional model")

    def drop(self, cond):
        return cond


class ClassCondition(nn.Module):
    """Class label -> one embedding (LlamaGen `LabelEmbedder`); row ``num_classes`` is the null class for CFG."""

    kind = "class"
    length = 1

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor, batch: int, tok_embed: TokenEmbed, device) -> torch.Tensor:
        return self.table(labels)[:, None]  # [B, 1, dim]

    def null(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, self.num_classes)

    def drop(self, labels: torch.Tensor) -> torch.Tensor:
        # LlamaGen replaces each label by the null class with probability class_dropout while training
        if self.dropout_prob <= 0:
            return labels
        hit = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
        return torch.where(hit, torch.full_like(labels, self.num_classes), labels)


class PrefixCondition(_StartToken):
    """Tokens of another vocabulary (DiGIT stage 2: discriminative tokens before VQ tokens), then a start token."""

    kind = "prefix"

    def __init__(self, prefix_vocab_size: int, prefix_len: int, dim: int, bos_id: int | None) -> None:
        super().__init__(dim, bos_id)
        self.prefix_len = prefix_len
        self.length = prefix_len + 1
        self.table = nn.Embedding(prefix_vocab_size, dim)

    def forward(self, prefix: torch.Tensor, batch: int, tok_embed: TokenEmbed, device) -> torch.Tensor:
        x = self.table(prefix)  # [B, P, dim]
        return torch.cat([x, self.embed_start(batch, tok_embed, device)], dim=1)

    def null(self, prefix):
        raise DigitError("classifier-free guidance needs a class-conditional model")

    def drop(self, prefix):
        return prefix


@dataclass(frozen=True)
class Caption:
    """Caption features [B, L, D_t] (float) and their mask [B, L] (bool, True where a real text token is)."""

    features: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def to(self, device) -> Caption:
        return Caption(self.features.to(device), self.mask.to(device))

    def __getitem__(self, rows) -> Caption:  # a row slice, as a label or prefix batch is sliced
        return Caption(self.features[rows], self.mask[rows])


def left_pad_captions(features: torch.Tensor, mask: torch.Tensor) -> Caption:
    """Right-padded encoder output (valid tokens first, as a T5 tokenizer pads) -> LlamaGen's sampler layout: each
    row's valid positions moved to the end, the padded positions (now at the start) zeroed, the mask flipped to match.
    Assumes each row's valid positions are a prefix of it (what padding gives)."""
    mask = mask.bool()
    L = mask.shape[1]
    valid = mask.sum(1)  # [B]
    # row b: source index of output position j is (j + valid_b) mod L (a rotation right by L - valid_b)
    src = (torch.arange(L, device=mask.device)[None] + valid[:, None]) % L
    rolled = features.gather(1, src[..., None].expand(-1, -1, features.shape[-1]))
    new_mask = torch.arange(L, device=mask.device)[None] >= (L - valid)[:, None]
    return Caption(rolled * new_mask[..., None].to(rolled.dtype), new_mask)


def cond_rows(cond) -> int:
    """Rows of a condition batch (labels, prefix tokens or a Caption)."""
    return len(cond) if isinstance(cond, Caption) else int(cond.shape[0])


def join_conditions(a, b):
    """Two condition batches stacked row-wise ([cond; null] for classifier-free guidance)."""
    if isinstance(a, Caption):
        return Caption(torch.cat([a.features, b.features]), torch.cat([a.mask, b.mask]))
    return torch.cat([a, b])


class CaptionMLP(nn.Module):
    """down(gelu_tanh(up x)), no biases (LlamaGen ``cap_proj``: fc1 = up, fc2 = down, hidden = out = model dim)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(in_dim, dim, bias=False)
        self.down = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class TextCondition(nn.Module):
    """Caption features -> ``caption_len`` condition embeddings; ``null_caption`` [L, D_t] is the unconditional
    caption (CFG, caption dropout). LlamaGen registers its ``uncond_embedding`` as a buffer (so it stays at its random
    N(0, 1/D_t) initialisation); here it is a parameter, trained by caption dropout, initialised the same way."""

    kind = "text"

    def __init__(self, caption_dim: int, caption_len: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.length = caption_len
        self.dropout_prob = dropout_prob
        self.mlp = CaptionMLP(caption_dim, dim)
        self.null_caption = nn.Parameter(torch.empty(caption_len, caption_dim))
        self.reset_null()

    def reset_null(self) -> None:
        with torch.no_grad():
            self.null_caption.normal_(std=self.null_caption.shape[1] ** -0.5)

    def forward(self, caption: Caption, batch: int, tok_embed: TokenEmbed, device) -> torch.Tensor:
        return self.mlp(caption.features.to(self.mlp.up.weight.dtype))  # [B, L, dim]

    def null(self, caption: Caption) -> Caption:
        # LlamaGen's sampler: the null caption under the same mask as the prompt's row
        f = caption.features
        return Caption(self.null_caption.to(f.dtype).expand(f.shape[0], -1, -1), caption.mask)

    def drop(self, caption: Caption) -> Caption:
        # LlamaGen: a dropped row's features become the null caption; its attention mask stays the caption's own
        if self.dropout_prob <= 0:
            return caption
        f = caption.features
        hit = torch.rand(f.shape[0], device=f.device) < self.dropout_prob
        return Caption(torch.where(hit[:, None, None], self.null_caption.to(f.dtype), f), caption.mask)


CONDITIONS = ("none", "class", "prefix", "text")


def build_condition(cfg) -> nn.Module:
    """The embedder for ``cfg.cond`` (a GPTConfig)."""
    if cfg.cond == "none":
        return NoCondition(cfg.dim, cfg.bos_id)
    if cfg.cond == "class":
        return ClassCondition(cfg.num_classes, cfg.dim, cfg.class_dropout)
    if cfg.cond == "prefix":
        ph, pw = cfg.prefix_grid
        return PrefixCondition(cfg.prefix_vocab_size, ph * pw, cfg.dim, cfg.bos_id)
    if cfg.cond == "text":
        return TextCondition(cfg.caption_dim, cfg.caption_len, cfg.dim, cfg.class_dropout)
    raise DigitError(f"unknown condition {cfg.cond!r} (choose from {', '.join(CONDITIONS)})")

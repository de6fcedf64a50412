"""Condition embedders: what the GPT sees before the first image token.

Each embedder turns a condition into ``[B, C, dim]`` embeddings occupying sequence positions 0..C-1; the first image
token is predicted from position C-1. A new condition kind (text embeddings, a later issue) is one more class here with
the same four members (``length``, ``forward``, ``null``, ``drop``) and one more entry in ``build_condition``.

Every embedder sits at ``GPT.condition``: ``condition.start`` (a learned start vector) and ``condition.table`` (class
or prefix-token embeddings). LlamaGen's ``cls_embedding.embedding_table`` and fairseq's BOS / class rows are mapped onto
these names by `digit.convert.keys`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
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


CONDITIONS = ("none", "class", "prefix")


def build_condition(cfg) -> nn.Module:
    """The embedder for ``cfg.cond`` (a GPTConfig)."""
    if cfg.cond == "none":
        return NoCondition(cfg.dim, cfg.bos_id)
    if cfg.cond == "class":
        return ClassCondition(cfg.num_classes, cfg.dim, cfg.class_dropout)
    if cfg.cond == "prefix":
        ph, pw = cfg.prefix_grid
        return PrefixCondition(cfg.prefix_vocab_size, ph * pw, cfg.dim, cfg.bos_id)
    raise DigitError(f"unknown condition {cfg.cond!r} (choose from {', '.join(CONDITIONS)})")

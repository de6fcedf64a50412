"""The GPT as a training ``Task``: token directories in, next-token (or MaskGIT) cross-entropy out.

- Autoregressive (``causal=True``): mean cross-entropy over all ``h*w`` positions (LlamaGen ``train_c2i.py``; DiGIT's
  fairseq criterion, label smoothing 0.1 there), ``logits[:, t]`` predicting ``tokens[:, t]``.
- MaskGIT (``causal=False``, ``digit train --nar``), per DiGIT section 4 / MaskGIT: for each sample draw u ~ U(0, 1),
  mask ``floor(T * cos(u * pi / 2) + 1)`` random positions with the mask token and score the masked positions only.
  fairseq divides the summed loss by the number of masked tokens in the whole (multi-GPU) batch; we divide by
  ``B * E[masked count]`` instead, the same token weighting but linear in the samples, so the loss and its gradient are
  identical whatever the split into ranks and micro-batches. The mask of a sample is a pure function of
  (seed, step, sample index), so it too does not depend on the layout (or on resuming).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from digit.data.tokens import TokenDirectory, check_provenance, class_label_map
from digit.errors import DigitError
from digit.models.conditions import Caption, left_pad_captions
from digit.training.finetune import RECORD_KEY, FineTune
from digit.training.optim import OptimizerConfig
from digit.training.task import OptimizerSpec, TaskBase


def expected_mask_count(T: int) -> float:
    """E[floor(T cos(u pi/2) + 1)], u ~ U(0,1): sum over m of P(count >= m) = (2/pi) arccos((m-1)/T), m = 1..T."""
    return sum(2 / math.pi * math.acos((m - 1) / T) for m in range(1, T + 1))


def nar_mask(T: int, seed: int, step: int, index: int) -> torch.Tensor:
    """Bool [T]: the positions MaskGIT masks for sample ``index`` at ``step`` (count floor(T cos(u pi/2) + 1))."""
    key = hashlib.sha256(f"nar:{seed}:{step}:{index}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    u = torch.rand((), generator=g, dtype=torch.float64).item()
    n = min(T, int(math.floor(T * math.cos(u * math.pi / 2) + 1)))
    mask = torch.zeros(T, dtype=torch.bool)
    mask[torch.randperm(T, generator=g)[:n]] = True
    return mask


class TokenDataset:
    """Rows of a token directory (and the aligned prefix directory) as ``{"tokens", "label", "prefix", "index"}``;
    with caption features (text models) also ``caption_features`` [L, D] float32 and ``caption_mask`` [L] bool, left
    padded as LlamaGen's t2i dataset stores them (the valid positions at the end)."""

    def __init__(
        self,
        tokens: TokenDirectory,
        prefix: TokenDirectory | None = None,
        captions: Any = None,
        label_map: np.ndarray | None = None,
    ) -> None:
        self.tokens, self.prefix, self.captions = tokens, prefix, captions
        self.label_map = label_map  # this directory's class ids -> the training directory's (`class_label_map`)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {
            "tokens": torch.from_numpy(np.asarray(self.tokens.tokens[i], dtype=np.int64).reshape(-1)),
            "label": torch.tensor(self._label(int(self.tokens.labels[i]))),
            "index": torch.tensor(int(i)),
        }
        if self.prefix is not None:
            item["prefix"] = torch.from_numpy(np.asarray(self.prefix.tokens[i], dtype=np.int64).reshape(-1))
        if self.captions is not None:
            f = torch.from_numpy(np.asarray(self.captions.features[i], dtype=np.float32))[None]
            cap = left_pad_captions(f, torch.from_numpy(np.asarray(self.captions.mask[i], dtype=bool))[None])
            item["caption_features"], item["caption_mask"] = cap.features[0], cap.mask[0]
        return item

    def _label(self, label: int) -> int:
        return label if self.label_map is None or label < 0 else int(self.label_map[label])


def read_captions(
    model_cfg: Any, tokens: TokenDirectory, what: str = "tokens", expect: Sequence[dict[str, Any] | None] = ()
) -> Any:
    """The caption features stored with a token directory, checked against a text model (None for other models) and
    against each text encoder identity in ``expect`` (`--text-encoder`, the init run's, the training features')."""
    if model_cfg.cond != "text":
        return None
    from digit.data.text_features import check_encoder, read_caption_features

    wants = [w for w in expect if w is not None]
    caps = read_caption_features(tokens.path, expect_encoder=wants[0] if wants else None)
    for want in wants[1:]:
        check_encoder(tokens.path, caps.encoder, want)
    n, L, D = caps.features.shape
    if n != len(tokens):
        raise DigitError(f"{what} in {tokens.path}: {n} caption feature rows for {len(tokens)} token rows")
    if (L, D) != (model_cfg.caption_len, model_cfg.caption_dim):
        raise DigitError(
            f"{what} in {tokens.path}: captions of {L} x {D} features, the model takes "
            f"{model_cfg.caption_len} x {model_cfg.caption_dim}"
        )
    return caps


def _max_id(arr: np.ndarray, chunk: int = 65536) -> int:
    return max((int(arr[i : i + chunk].max()) for i in range(0, len(arr), chunk)), default=-1)


def check_alignment(target: TokenDirectory, prefix: TokenDirectory) -> None:
    """Refuse a prefix directory that does not come from the same images in the same order."""
    t, p = target.meta, prefix.meta
    for key in ("n_rows", "n_images", "views"):
        if t.get(key) != p.get(key):
            raise DigitError(
                f"prefix tokens {prefix.path} are not aligned with {target.path}: {key} {p.get(key)} != {t.get(key)}"
            )
    ts, ps = t.get("source") or {}, p.get("source") or {}
    for key in ("path", "n_files", "n_skipped", "limit"):
        if ts.get(key) != ps.get(key):
            raise DigitError(
                f"prefix tokens {prefix.path} come from another source than {target.path}: "
                f"source {key} {ps.get(key)!r} != {ts.get(key)!r}"
            )
    skipped = [[s.get("file") for s in d.get("skipped", [])] for d in (ts, ps)]
    if skipped[0] != skipped[1]:
        raise DigitError(f"prefix tokens {prefix.path} skipped other images than {target.path}")


def validate_tokens(
    model_cfg: Any, tokens: TokenDirectory, prefix: TokenDirectory | None, what: str = "tokens"
) -> None:
    """Every refusal happens here, before any training: vocabulary, grid, labels, prefix alignment."""
    if tuple(tokens.grid) != tuple(model_cfg.grid):
        raise DigitError(
            f"{what} grid {tokens.grid} ({tokens.grid[0] * tokens.grid[1]} tokens) does not match the "
            f"model's grid {tuple(model_cfg.grid)} ({model_cfg.seq_len} tokens)"
        )
    hi = _max_id(tokens.tokens)
    if hi >= model_cfg.vocab_size:
        raise DigitError(f"{what} hold id {hi}, outside the model's vocabulary of {model_cfg.vocab_size}")
    if model_cfg.cond == "class":
        if len(tokens.labels) == 0 or (tokens.labels < 0).any():
            raise DigitError(f"{what} in {tokens.path} lack class labels, needed by a class-conditional model")
        if int(tokens.labels.max()) >= model_cfg.num_classes:
            raise DigitError(f"{what} hold class {int(tokens.labels.max())}, the model has {model_cfg.num_classes}")
    if model_cfg.cond == "prefix":
        if prefix is None:
            raise DigitError("a prefix-conditioned model needs --prefix-tokens")
        check_alignment(tokens, prefix)
        if tuple(prefix.grid) != tuple(model_cfg.prefix_grid):
            raise DigitError(f"prefix grid {prefix.grid} does not match the model's {tuple(model_cfg.prefix_grid)}")
        phi = _max_id(prefix.tokens)
        if phi >= model_cfg.prefix_vocab_size:
            raise DigitError(
                f"prefix tokens hold id {phi}, outside the prefix vocabulary of {model_cfg.prefix_vocab_size}"
            )
    elif prefix is not None:
        raise DigitError("--prefix-tokens given but the model is not prefix-conditioned")


class GPTTask(TaskBase):
    name = "gpt"
    unit = "tokens"

    def __init__(
        self,
        model_cfg: Any,
        tokens: TokenDirectory,
        *,
        prefix: TokenDirectory | None = None,
        val: TokenDirectory | None = None,
        val_prefix: TokenDirectory | None = None,
        optim: OptimizerConfig | dict[str, Any],
        label_smoothing: float | None = None,
        total_steps: int | None = None,
        seed: int = 0,
        eval_batch_size: int = 64,
        init: FineTune | None = None,
        text_encoder: dict[str, Any] | None = None,
    ) -> None:
        """``label_smoothing`` (when given) replaces ``optim``'s; ``total_steps`` (the cosine horizon) is set by the
        ``Trainer`` that runs the task (given here, it must agree with the trainer's count). ``init``: start from a
        trained model's weights, with frozen groups (`digit.training.finetune`). ``text_encoder``: the identity of
        the encoder the caption features must come from (`digit train --text-encoder`), as the init run's must."""
        from digit.models.gpt import GPT

        if init is not None:  # first: its refusals say what the init model needs (e.g. --num-classes)
            init.check_tokens(model_cfg, tokens, prefix)
            if val is not None:
                init.check_tokens(model_cfg, val, val_prefix, what="validation tokens")
        validate_tokens(model_cfg, tokens, prefix)
        val_labels = None
        if val is not None:
            validate_tokens(model_cfg, val, val_prefix, what="validation tokens")
            check_provenance(
                val, tokens.meta, "tokenizer"
            )  # the training tokens' codebook, not only the same K and grid
            if model_cfg.cond == "class":
                val_labels = class_label_map(tokens, val)
        if not isinstance(optim, OptimizerConfig):
            optim = OptimizerConfig.from_dict(optim)
        if label_smoothing is not None:
            optim = dataclasses.replace(optim, label_smoothing=label_smoothing)
        self.cfg, self.optim, self.seed = model_cfg, optim, seed
        self.total_steps, self.eval_batch_size = total_steps, eval_batch_size
        expect = (text_encoder, init.text_encoder if init is not None else None)
        captions = read_captions(model_cfg, tokens, expect=expect)
        if val is not None:  # the validation features also from the training features' encoder
            train_encoder = captions.encoder if captions is not None else None
            val_captions = read_captions(model_cfg, val, "validation tokens", expect=(*expect, train_encoder))
        else:
            val_captions = None
        self.dataset = TokenDataset(tokens, prefix, captions)
        self.val = TokenDataset(val, val_prefix, val_captions, val_labels) if val is not None else None
        self._data_cfg = {
            "tokens": str(Path(tokens.path).resolve()),
            "prefix_tokens": str(Path(prefix.path).resolve()) if prefix is not None else None,
            "meta": tokens.meta,
            "prefix_meta": prefix.meta if prefix is not None else None,
            "val_tokens": str(Path(val.path).resolve()) if val is not None else None,
        }
        if captions is not None:  # checked again when prompts are encoded for this model
            self._data_cfg["text_encoder"] = captions.encoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights are a function of the seed alone
            self.model = GPT(model_cfg)
        self.frozen = init.apply(self.model) if init is not None else []
        self.init = dataclasses.replace(init, state=None) if init is not None else None  # the weights are in the model
        self._mask_norm = expected_mask_count(model_cfg.seq_len)

    # ---- Task protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    @property
    def label_smoothing(self) -> float:
        return self.optim.label_smoothing

    def set_run_length(self, steps_per_epoch: int, total_steps: int) -> None:
        if self.total_steps is not None and self.total_steps != total_steps:
            raise DigitError(f"the task was built for {self.total_steps} steps, the trainer runs {total_steps}")
        self.total_steps = total_steps

    def optimizers(self) -> list[OptimizerSpec]:
        if self.total_steps is None:
            raise DigitError("the run length is unknown: run the task through a Trainer or pass total_steps")
        return [self.optim.spec(["model"], self.total_steps)]

    def config(self) -> dict[str, Any]:
        config = {
            "model": self.cfg.to_dict(),
            "data": self._data_cfg,
            "train": {**self.optim.to_dict(), "nar": not self.cfg.causal},
        }
        if self.init is not None:
            config[RECORD_KEY] = self.init.record(self.cfg)
        return config

    def _cond(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.cfg.cond == "class":
            return batch["label"]
        if self.cfg.cond == "prefix":
            return batch["prefix"]
        if self.cfg.cond == "text":
            return Caption(batch["caption_features"], batch["caption_mask"])
        return None

    def compute_loss(self, batch: dict[str, torch.Tensor], step: int, phase: str = "main"):
        return self.loss(batch, step)

    def loss(
        self, batch: dict[str, torch.Tensor], step: int, smoothing: float | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``smoothing``: the label smoothing (default: training's; evaluation passes 0, the plain NLL)."""
        x = batch["tokens"]  # [B, T]
        ls = self.label_smoothing if smoothing is None else smoothing
        if self.cfg.causal:
            logits = self.model(x, self._cond(batch))  # [B, T, V] fp32
            loss = F.cross_entropy(logits.flatten(0, 1), x.flatten(), label_smoothing=ls)
            return loss, {}
        B, T = x.shape
        mask = torch.stack([nar_mask(T, self.seed, step, int(i)) for i in batch["index"].tolist()]).to(x.device)
        inp = x.masked_fill(mask, self.model.mask_token_id)
        logits = self.model(inp, self._cond(batch))  # [B, T, V]
        ce = F.cross_entropy(logits.flatten(0, 1), x.flatten(), label_smoothing=ls, reduction="none").view(B, T)
        loss = (ce * mask).sum() / (B * self._mask_norm)
        return loss, {"masked_frac": mask.float().mean()}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["tokens"].numel())

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Validation loss (the NLL, without label smoothing) over the whole held-out split (every rank computes it;
        NAR masks fixed by ``step=-1``)."""
        if self.val is None:
            return {}
        device = next(self.model.parameters()).device
        total, n = 0.0, 0
        for s in range(0, len(self.val), self.eval_batch_size):
            items = [self.val[i] for i in range(s, min(len(self.val), s + self.eval_batch_size))]
            batch = {k: v.to(device) for k, v in self.collate(items).items()}
            loss, _ = self.loss(batch, -1, smoothing=0.0)  # the NLL, comparable across label smoothings
            total += float(loss) * len(items)
            n += len(items)
        return {"val_loss": total / n}

"""AdamW with weight decay on matrices only, learning-rate schedules, and gradient clipping.

Schedules are multipliers of the peak lr, pure functions of the optimizer step (0-based: the lr used *for* step ``s``),
so a resumed run recomputes them instead of checkpointing a scheduler object.
- ``warmup_cosine``: linear warmup from ``warmup_init`` (a fraction of the peak) to 1 over ``warmup`` steps, then cosine
  to ``min_ratio`` at ``total`` (the usual GPT recipe).
- ``inverse_sqrt``: fairseq's ``inverse_sqrt`` scheduler (what DiGIT trains with): linear warmup from
  ``warmup_init_lr`` to the peak over ``warmup`` updates, then ``peak * sqrt(warmup / s)``.
- ``constant``: LlamaGen's c2i recipe (constant 1e-4), optionally with a linear warmup.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from digit.training.task import OptimizerSpec, Schedule

SCHEDULES = ("constant", "cosine", "inverse-sqrt")


def constant(warmup: int = 0, warmup_init: float = 0.0) -> Schedule:
    def at(step: int) -> float:
        if warmup > 0 and step < warmup:
            return warmup_init + (1.0 - warmup_init) * step / warmup
        return 1.0

    return at


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0, warmup_init: float = 0.0) -> Schedule:
    def at(step: int) -> float:
        if warmup > 0 and step < warmup:
            return warmup_init + (1.0 - warmup_init) * step / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return at


def inverse_sqrt(warmup: int, warmup_init: float = 0.0) -> Schedule:
    """fairseq ``inverse_sqrt``: lr(num_updates) with num_updates = step (fairseq sets the lr for update 0 from init)."""

    def at(step: int) -> float:
        if warmup > 0 and step < warmup:
            return warmup_init + (1.0 - warmup_init) * step / warmup
        return math.sqrt(max(warmup, 1) / max(step, 1))

    return at


def make_schedule(name: str, *, warmup: int, total: int, min_ratio: float = 0.0, warmup_init: float = 0.0) -> Schedule:
    if name == "constant":
        return constant(warmup, warmup_init)
    if name == "cosine":
        return warmup_cosine(warmup, total, min_ratio, warmup_init)
    if name == "inverse-sqrt":
        return inverse_sqrt(warmup, warmup_init)
    raise ValueError(f"unknown schedule {name!r} (choose from {', '.join(SCHEDULES)})")


def param_groups(named: Iterable[tuple[str, nn.Parameter]], spec: OptimizerSpec) -> list[dict]:
    """Group trainable tensors by (decay?, lr scale). Group dicts carry ``decay`` and ``lr_scale`` for the trainer."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        decay = not spec.no_decay(name, p)
        scale = float(spec.lr_scale(name, p)) if spec.lr_scale is not None else 1.0
        g = groups.setdefault(
            (decay, scale),
            {"params": [], "names": [], "decay": decay, "lr_scale": scale, "weight_decay": spec.weight_decay * decay},
        )
        g["params"].append(p)
        g["names"].append(name)
    # A fixed group order (decayed first) keeps optimizer state dicts stable across runs and layouts.
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], k[1]))]


def build_adamw(
    named: Iterable[tuple[str, nn.Parameter]], spec: OptimizerSpec, device: torch.device
) -> torch.optim.AdamW:
    groups = param_groups(named, spec)
    if not groups:
        raise ValueError(f"optimizer {spec.name!r} has no trainable parameters")
    fused = spec.fused if spec.fused is not None else device.type == "cuda"
    kwargs = {"fused": True} if fused else {"foreach": True}
    for g in groups:
        del g["names"]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, **kwargs)


def set_hyperparameters(optimizer: torch.optim.Optimizer, spec: OptimizerSpec, step: int) -> float:
    """Set every group's lr (and weight decay, when scheduled) for ``step``; return the base lr."""
    lr = spec.lr_at(step)
    wd = spec.wd_schedule(step) if spec.wd_schedule is not None else spec.weight_decay
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = wd if g.get("decay", True) else 0.0
    return lr


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of the gradients (DTensor-aware under FSDP2); clip when ``max_norm`` is set."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm is not None else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2: the norm is already reduced across shards
        norm = norm.full_tensor()
    return norm

"""AdamW with weight decay on matrices only, learning-rate schedules, and gradient clipping.

Schedules are multipliers of the peak lr, pure functions of the optimizer step (0-based: the lr used *for* step ``s``),
so a resumed run recomputes them instead of checkpointing a scheduler object.
- ``warmup_cosine``: linear warmup from ``warmup_init`` (a fraction of the peak) to 1 over ``warmup`` steps, then cosine
  to ``min_ratio`` at ``total`` (the usual GPT recipe).
- ``inverse_sqrt``: fairseq's ``inverse_sqrt`` scheduler (what DiGIT trains with): linear warmup from
  ``warmup_init_lr`` to the peak over ``warmup`` updates, then ``peak * sqrt(warmup / s)``.
- ``constant``: LlamaGen's c2i recipe (constant 1e-4), optionally with a linear warmup.

:class:`OptimizerConfig` is the GPT's typed optimisation setting (saved with the run as config.json ``"train"``);
:data:`RECIPES` are the published ones it starts from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from digit.errors import DigitError
from digit.training.task import OptimizerSpec, Schedule

SCHEDULES = ("constant", "cosine", "inverse-sqrt")


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW hyper-parameters, the lr schedule, gradient clipping and label smoothing of a GPT run.

    ``weight_decay`` is decoupled and applies to matrices only unless ``wd_all_params`` (fairseq decays every tensor).
    ``warmup_init_lr`` is the lr at step 0 of a ``warmup``-step linear warmup; ``min_lr_ratio`` the cosine floor as a
    fraction of ``lr``; ``clip`` the max global gradient norm (0: off). ``recipe`` names the preset of
    :data:`RECIPES` the unset values came from (None: none). ``to_dict()`` is what config.json stores under ``"train"``.
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    wd_all_params: bool = False
    schedule: str = "constant"
    warmup: int = 0
    warmup_init_lr: float = 0.0
    min_lr_ratio: float = 0.0
    clip: float = 0.0
    label_smoothing: float = 0.0
    recipe: str | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives a list
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise DigitError(f"optimizer betas must be two numbers in [0, 1), got {list(self.betas)}")
        for name in ("lr", "eps", "weight_decay", "warmup_init_lr", "min_lr_ratio", "clip", "label_smoothing"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise DigitError(f"optimizer {name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise DigitError(f"optimizer warmup must be an integer >= 0, got {self.warmup!r}")
        if self.schedule not in SCHEDULES:
            raise DigitError(f"unknown schedule {self.schedule!r} (choose from {', '.join(SCHEDULES)})")
        if self.label_smoothing > 1.0:
            raise DigitError(f"label smoothing must be <= 1, got {self.label_smoothing}")

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> OptimizerConfig:
        """The recipe ``name`` with every override that is not None (unset CLI flags are None)."""
        if name not in RECIPES:
            raise DigitError(f"unknown optimizer recipe {name!r} (choose from {', '.join(sorted(RECIPES))})")
        return dataclasses.replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizerConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise DigitError(f"unknown optimizer config keys: {', '.join(unknown)}")
        return cls(**d)

    def spec(self, modules: list[str], total_steps: int) -> OptimizerSpec:
        """The trainer's ``OptimizerSpec`` for ``modules`` over a run of ``total_steps``."""
        schedule = make_schedule(
            self.schedule,
            warmup=self.warmup,
            total=total_steps,
            min_ratio=self.min_lr_ratio,
            warmup_init=self.warmup_init_lr / self.lr if self.lr > 0 else 0.0,
        )
        extra = {"no_decay": lambda name, p: False} if self.wd_all_params else {}
        return OptimizerSpec(
            modules=list(modules),
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            clip=self.clip or None,
            schedule=schedule,
            **extra,
        )


RECIPES: dict[str, OptimizerConfig] = {
    # LlamaGen train_c2i.py: AdamW (0.9, 0.95), wd 0.05 on matrices, constant lr 1e-4, clip 1.0
    "llamagen": OptimizerConfig(
        recipe="llamagen", lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, schedule="constant", clip=1.0
    ),
    # DiGIT stage 1 (fairseq): Adam (0.9, 0.98), decoupled wd 0.01, inverse-sqrt warmup 6250 updates from 1e-7 to
    # 3e-4, clip 1.0, label smoothing 0.1 (fairseq decays every tensor: set wd_all_params for that)
    "digit": OptimizerConfig(
        recipe="digit",
        lr=3e-4,
        betas=(0.9, 0.98),
        weight_decay=0.01,
        schedule="inverse-sqrt",
        warmup=6250,
        warmup_init_lr=1e-7,
        clip=1.0,
        label_smoothing=0.1,
    ),
}


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

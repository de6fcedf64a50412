"""Exponential moving average of weights: ``ema = decay * ema + (1 - decay) * param`` after every optimizer step.

Works on the local shards under FSDP2 (parameters are DTensors; the shadow copies share their sharding), so the update
needs no communication; ``full_state_dict`` gathers it for saving. Buffers (norm statistics, codebook usage) are copied,
not averaged. The same ``ema_update_`` serves DINO's teacher (``decay`` = the scheduled momentum).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], source: list[torch.Tensor], decay: float) -> None:
    """In place: ``target = decay * target + (1 - decay) * source`` (float tensors; others are copied)."""
    floats = [(t, s) for t, s in zip(target, source, strict=True) if t.is_floating_point()]
    if floats:
        ts, ss = zip(*floats)
        torch._foreach_lerp_(list(ts), [s.detach().to(t.dtype) for t, s in floats], 1.0 - decay)
    for t, s in zip(target, source):
        if not t.is_floating_point():
            t.copy_(s)


class EMA:
    """Shadow copies of a module's parameters (and persistent buffers), updated after each optimizer step."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = module
        persistent = set(module.state_dict())
        self.param_names = [k for k, _ in module.named_parameters()]
        self.buffer_names = [k for k, _ in module.named_buffers() if k in persistent]
        cur = _tensors(module)
        self.shadow: dict[str, torch.Tensor] = {
            k: cur[k].detach().clone() for k in self.param_names + self.buffer_names
        }

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        cur = _tensors(self.module)
        ema_update_(
            [self.shadow[k] for k in self.param_names],
            [cur[k] for k in self.param_names],
            self.decay if decay is None else decay,
        )
        for k in self.buffer_names:
            self.shadow[k].copy_(cur[k])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the averaged weights inside the block (to evaluate what gets saved), its own after it,
        bit for bit (copies, so training resumes exactly)."""
        cur = _tensors(self.module)
        names = self.param_names + self.buffer_names
        with torch.no_grad():
            own = {k: cur[k].detach().clone() for k in names}
            for k in names:
                cur[k].copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k in names:
                    cur[k].copy_(own[k])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (gathered, CPU) tensors, keyed like ``module.state_dict()``. Collective under FSDP2: call on all ranks."""
        out = {}
        for k, v in self.shadow.items():
            if hasattr(v, "full_tensor"):
                v = v.full_tensor()
            out[k] = v.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for k, v in self.shadow.items():
            src = state[k]
            if hasattr(v, "device_mesh"):  # DTensor: keep only this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(v.device, v.dtype), v.device_mesh, v.placements)
                v.to_local().copy_(src.to_local())
            else:
                v.copy_(src)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_buffers()), **dict(module.named_parameters())}

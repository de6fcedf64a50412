"""The ``Task`` protocol: what a trainable thing gives the one ``Trainer`` (GPT, VQGAN + discriminator, DINO student/teacher).

The trainer owns the loop: data order, gradient accumulation, mixed precision, parallelism, optimizers and their
schedules, clipping, EMA of weights, checkpoints, exact resume, metrics and the progress bar. A task owns the science:
which modules exist, what one sample is, and what the loss is. Models know nothing of parallelism (torchtitan's rule):
the trainer shards / replicates the task's modules **in place** (FSDP2 ``fully_shard`` per block, or the composable
``replicate`` for DDP), so a task keeps calling ``self.model(...)`` as it always did.

What a task provides
--------------------
``name: str``
    ``"gpt"``, ``"vqgan"``, ``"dino"``...; written to ``config.json`` as ``"task"``.
``modules() -> dict[str, nn.Module]``
    Every module whose state is checkpointed, by name (``{"model": gpt}``; ``{"generator": vq, "discriminator": d}``;
    ``{"student": s, "teacher": t}``). The trainer moves them to the device. Modules trained by an optimizer are wrapped
    for data parallelism; the others (an EMA teacher, a buffer-only loss module holding DINO's center) are moved and
    sharded the same way under FSDP (so an element-wise EMA of student -> teacher works on local shards) and left
    unwrapped under DDP (their updates are deterministic, so every rank holds the same values).
``optimizers() -> list[OptimizerSpec]``
    One spec per optimizer, in the order they step each iteration ("phases"). A spec names the modules it trains, its
    hyper-parameters and schedules (see :class:`OptimizerSpec`). Weight decay applies to tensors with ``ndim >= 2``
    only unless ``no_decay`` says otherwise (nanoGPT / LlamaGen ``train_c2i.py`` rule).
``dataset``
    A deterministic, indexable training set: ``len(dataset)`` and ``dataset[i] -> sample`` (any nest of tensors /
    numbers / dicts). It must be a pure function of ``i`` (and of the epoch, if it has ``set_epoch(epoch)``, which the
    trainer calls at each epoch start and on resume): random augmentations derive their seed from (seed, index, epoch).
    The trainer decides the order: a permutation that is a pure function of (seed, epoch), drop-last, the global
    batch cut into ``world_size x grad_accum`` contiguous micro-batches; the data position is the step counter.
``collate(samples: list) -> batch`` (optional; default ``torch.utils.data.default_collate``).
``compute_loss(batch, step: int, phase: str) -> (loss, metrics)``
    ``batch`` is one micro-batch already on the device; ``step`` the 0-based optimizer step being computed; ``phase``
    the name of the optimizer spec being stepped (single-optimizer tasks ignore it). Return the scalar loss to
    back-propagate, **a mean over the micro-batch** (the trainer divides by ``grad_accum``; data-parallel gradient
    reduction averages over ranks, so the update equals one process with the same global batch), and a dict of floats
    or 0-d tensors to log (averaged over micro-batches). Multi-optimizer tasks are called once per phase per
    micro-batch with all gradients zeroed before each phase, as taming's VQGAN ``training_step(optimizer_idx)`` does:
    the generator phase may back-propagate through the discriminator (its gradients are discarded), the discriminator
    phase recomputes (or re-uses a cached, detached) reconstruction. Under DDP each module must see one forward per
    backward (concatenate real and fake before calling the discriminator), and a module that only feeds a phase's
    inputs runs under ``torch.no_grad()`` there (else DDP waits for its gradients). Randomness: use the global torch
    RNG (the trainer seeds it per rank and checkpoints it) or a generator seeded from (seed, step, sample index), which
    also makes the result independent of the parallel layout. Runs under bf16 autocast on CUDA.

Optional hooks (absent = no-op; :class:`TaskBase` provides all defaults)
-----------------------------------------------------------------------
``count(batch) -> int``            units in a micro-batch for throughput ("tokens" for the GPT); default: batch length.
``unit: str``                      the name of that unit ("tokens", "images"); default "samples".
``ema_modules: list[str]``         modules the trainer keeps an EMA of when ``TrainConfig.ema > 0`` (default: every
                                   module an optimizer trains); the EMA weights are what ``export`` receives.
``shard_units(name, module) -> list[nn.Module]``
                                   sub-modules to shard (FSDP2) / compile one by one (transformer blocks); default: the
                                   members of every top-level ``nn.ModuleList``.
``set_run_length(steps_per_epoch, total_steps)``
                                   called once by the ``Trainer``, which owns the step count (from ``--steps`` or
                                   ``--epochs``, see ``digit.training.steps.total_steps``), before ``optimizers()``:
                                   schedules over the whole run take their horizon from here.
``before_step(step)``              called before the step's first forward (e.g. teacher temperature for this step).
``after_optimizer_step(step, phase)``
                                   called right after ``phase``'s optimizer stepped (e.g. DINO's EMA teacher update with
                                   the momentum of this step; weights are updated, gradients still present).
``evaluate(step) -> dict``         called on every rank every ``eval_every`` steps (if > 0) and at the end, no_grad,
                                   with modules in eval mode; return floats to log (``val_loss``, ``knn_top1``...).
                                   Use no global RNG here (or a local generator), so evaluating never changes training.
``state_dict() -> dict`` / ``load_state_dict(d)``
                                   extra task state not held in modules (plain tensors / numbers; weights_only-safe).
``config() -> dict``               JSON-serialisable: everything to rebuild the modules and the data pipeline (GPT:
                                   ``{"model": ..., "data": ...}``); merged into ``config.json`` next to ``"train"``.
                                   On ``--resume`` it must equal the stored one, else the run is refused.
``export(run_dir, weights)``       write the final / periodic artefacts. ``weights[name]`` is a full CPU state dict of
                                   each module (the EMA weights where the trainer keeps an EMA). Default: write
                                   ``model.safetensors`` with ``weights[primary]`` where ``primary`` is the first module.

How the trainer calls it (per optimizer step ``s``)
---------------------------------------------------
::

    task.before_step(s)
    for spec in specs:                           # task.optimizers(), fetched once; skipped when not spec.active(s)
        zero all gradients
        set lr (spec.lr * spec.schedule(s)) and weight decay (spec.wd_schedule(s) when given)
        for micro in micro_batches(s):           # this rank's grad_accum micro-batches
            loss, metrics = task.compute_loss(micro, s, spec.name)
            (loss / grad_accum).backward()
        all-reduce gradients across ranks; clip spec.clip (global L2 norm); optimizer.step()
        task.after_optimizer_step(s, spec.name)
    EMA update of the trainer's own EMA (when on); log; checkpoint every save_every steps
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

Schedule = Callable[[int], float]


def no_decay_default(name: str, param: torch.Tensor) -> bool:
    """Exclude biases, norm weights and other < 2-D tensors from weight decay (nanoGPT, LlamaGen, DINO)."""
    return param.ndim < 2


@dataclass(kw_only=True)
class OptimizerSpec:
    """One optimizer: the modules it trains and its hyper-parameters (AdamW; ``weight_decay`` is decoupled).

    ``schedule(step)`` multiplies ``lr`` (see :mod:`digit.training.optim` for warmup + cosine / inverse-sqrt);
    ``wd_schedule(step)``, when given, *replaces* ``weight_decay`` on the decayed group each step (DINO's cosine
    0.04 -> 0.4). ``active(step)`` false skips the whole phase that step (a discriminator switched on at 20k steps).
    ``lr_scale(name, param)`` returns a per-tensor lr multiplier (layer-wise decay); tensors with equal
    (decay, scale) share a param group. ``clip`` is the max global gradient L2 norm (None: no clipping; the norm is
    still logged).
    """

    name: str = "main"
    modules: list[str]
    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float | None = None
    schedule: Schedule | None = None
    wd_schedule: Schedule | None = None
    active: Callable[[int], bool] | None = None
    no_decay: Callable[[str, torch.Tensor], bool] = field(default=no_decay_default)
    lr_scale: Callable[[str, torch.Tensor], float] | None = None
    fused: bool | None = None  # None: fused AdamW on CUDA, foreach on CPU

    def lr_at(self, step: int) -> float:
        return self.lr * (self.schedule(step) if self.schedule is not None else 1.0)

    def is_active(self, step: int) -> bool:
        return self.active is None or bool(self.active(step))


@runtime_checkable
class Task(Protocol):
    """The minimum a task implements; see the module docstring for the optional hooks."""

    name: str
    dataset: Any

    def modules(self) -> dict[str, nn.Module]: ...

    def optimizers(self) -> list[OptimizerSpec]: ...

    def compute_loss(self, batch: Any, step: int, phase: str) -> tuple[torch.Tensor, dict[str, Any]]: ...


class TaskBase:
    """Defaults for every optional hook. Subclass it and implement ``modules``, ``optimizers``, ``compute_loss``."""

    name: str = "task"
    unit: str = "samples"
    dataset: Any = None

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def optimizers(self) -> list[OptimizerSpec]:
        raise NotImplementedError

    def compute_loss(self, batch: Any, step: int, phase: str) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def collate(self, samples: list) -> Any:
        return torch.utils.data.default_collate(samples)

    def count(self, batch: Any) -> int:
        if isinstance(batch, torch.Tensor):
            return int(batch.shape[0])
        if isinstance(batch, dict):
            return self.count(next(iter(batch.values())))
        if isinstance(batch, (list, tuple)):
            return self.count(batch[0])
        return 1

    def shard_units(self, name: str, module: nn.Module) -> list[nn.Module]:
        return [m for child in module.children() if isinstance(child, nn.ModuleList) for m in child]

    def set_run_length(self, steps_per_epoch: int, total_steps: int) -> None:
        pass

    def before_step(self, step: int) -> None:
        pass

    def before_optimizer_step(self, step: int, phase: str) -> None:
        """After backward and the gradient reduction, before clipping and the update (e.g. drop a frozen grad)."""

    def after_optimizer_step(self, step: int, phase: str) -> None:
        pass

    def evaluate(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def config(self) -> dict[str, Any]:
        return {}

    def export(self, run_dir: Path, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        from digit.utils.io import atomic_save_safetensors

        primary = next(iter(self.modules()))
        atomic_save_safetensors(Path(run_dir) / "model.safetensors", weights[primary])


def cosine_momentum(base: float, final: float, total_steps: int) -> Schedule:
    """DINO's teacher-momentum schedule: ``final - (final - base) * (cos(pi * s / total) + 1) / 2``."""

    def at(step: int) -> float:
        t = min(step, total_steps) / max(total_steps, 1)
        return final - (final - base) * (math.cos(math.pi * t) + 1) / 2

    return at

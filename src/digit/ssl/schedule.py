"""The optimizer and run-length rules shared by the self-supervised tasks that train one ``student`` for a number of
epochs (DINO in :mod:`digit.ssl.task`, distillation in :mod:`digit.ssl.distill`): AdamW at a peak lr with linear
warm-up then cosine decay to ``min_lr``, weight decay on its own cosine, schedules built for the task's epochs."""

from __future__ import annotations

from typing import Any

from digit.errors import DigitError
from digit.ssl.dino import cosine_schedule
from digit.training.task import OptimizerSpec


def student_optimizer(cfg: Any, peak_lr: float, steps_per_epoch: int, total: int) -> OptimizerSpec:
    """``cfg`` has ``warmup_epochs``, ``min_lr``, ``weight_decay``, ``weight_decay_end`` and ``clip``."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    min_ratio = cfg.min_lr / peak_lr
    return OptimizerSpec(
        modules=["student"],
        lr=peak_lr,
        betas=(0.9, 0.999),
        weight_decay=cfg.weight_decay,
        clip=cfg.clip,
        schedule=lambda s: cosine_schedule(s, total, 1.0, min_ratio, warmup=min(warm, total - 1)),
        wd_schedule=lambda s: cosine_schedule(s, total, cfg.weight_decay, cfg.weight_decay_end),
    )


def check_run_length(task: str, configured: tuple[int, int], trainer: tuple[int, int]) -> None:
    """The schedules are built for the task config's epochs and batch: the trainer must run the same length.
    ``configured`` and ``trainer``: (steps per epoch, total steps)."""
    if trainer != configured:
        raise DigitError(
            f"the {task} task is configured for {configured[1]} steps ({configured[0]} per epoch), the trainer runs "
            f"{trainer[1]} ({trainer[0]} per epoch): give both the same epochs and batch"
        )

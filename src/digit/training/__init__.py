"""The one trainer and its parts. Every trained thing is a ``Task`` (``task.py``) run by ``Trainer`` (``trainer.py``)."""

from digit.training.task import OptimizerSpec, Task, TaskBase
from digit.training.trainer import TrainConfig, Trainer

__all__ = ["OptimizerSpec", "Task", "TaskBase", "TrainConfig", "Trainer"]

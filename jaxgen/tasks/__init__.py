"""Model families as tasks: `model.kind` picks one; the trainer, evaluation and generation ask it everything.

See `jaxgen.tasks.base` for the contract a new family implements.
"""

from __future__ import annotations

from jaxgen.config import Config
from jaxgen.tasks.base import ModelSpec, Phase, Task, TaskData, Weights

__all__ = ["ModelSpec", "Phase", "Task", "TaskData", "Weights", "make_task"]


def make_task(cfg: Config) -> Task:
    if cfg.model.kind == "dit":
        from jaxgen.tasks.diffusion import DiffusionTask  # keeps image dependencies out of LM runs

        return DiffusionTask(cfg)
    from jaxgen.tasks.lm import LanguageModelTask

    return LanguageModelTask(cfg)

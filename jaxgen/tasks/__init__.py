"""Model families as tasks: `model.kind` picks one; the trainer, evaluation and generation ask it everything.

See `jaxgen.tasks.base` for the contract a new family implements.
"""

from __future__ import annotations

import pathlib

from jaxgen.config import Config
from jaxgen.tasks.base import ModelSpec, Phase, Task, TaskData, Weights

__all__ = ["ModelSpec", "Phase", "Task", "TaskData", "Weights", "keep_frozen_inputs", "make_task",
           "with_frozen_settings"]


def make_task(cfg: Config, run_dir: pathlib.Path | None = None) -> Task:
    """The task of `cfg`; `run_dir`: the run's, where a task opens what the run kept there (a frozen text
    encoder's settings and tokenizer)."""
    # Each family's module is imported only for its runs (keeps image dependencies out of LM runs).
    if cfg.model.kind == "dit":
        from jaxgen.tasks.diffusion import DiffusionTask

        return DiffusionTask(cfg, run_dir)
    if cfg.model.kind == "autoencoder":
        from jaxgen.tasks.autoencoder import AutoencoderTask

        return AutoencoderTask(cfg)
    if cfg.model.kind == "gan":
        from jaxgen.tasks.gan import GANTask

        return GANTask(cfg)
    if cfg.model.kind == "encoder":
        from jaxgen.tasks.mlm import MaskedLMTask

        return MaskedLMTask(cfg)
    if cfg.model.kind == "encoder_decoder":
        from jaxgen.tasks.seq2seq import Seq2SeqTask

        return Seq2SeqTask(cfg)
    from jaxgen.tasks.lm import LanguageModelTask

    return LanguageModelTask(cfg)


def with_frozen_settings(cfg: Config) -> Config:
    """`cfg` as a run keeps it in its config.yaml: with the model settings of the autoencoder it freezes (latent
    diffusion), so that the run opens where that autoencoder's run has moved or is gone."""
    if cfg.model.kind != "dit" or cfg.diffusion.autoencoder is None:
        return cfg
    from jaxgen.tasks.latents import frozen_autoencoder_settings

    diffusion = cfg.diffusion.model_copy(update={"autoencoder_model": frozen_autoencoder_settings(cfg)})
    return cfg.model_copy(update={"diffusion": diffusion})


def keep_frozen_inputs(task: Task, run_dir: pathlib.Path) -> None:
    """Keep in a new run's directory what it needs of the runs it froze to open without them (a text encoder's
    settings and tokenizer; their parameters are in the run's checkpoints)."""
    keep = getattr(task, "keep_frozen", None)  # the families with frozen runs of their own
    if keep is not None:
        keep(run_dir)

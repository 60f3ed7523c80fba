"""Model families as tasks: `model.kind` picks one; the trainer, evaluation and generation ask it everything.

See `jaxgen.tasks.base` for the contract a new family implements.
"""

from __future__ import annotations

from jaxgen.config import Config
from jaxgen.tasks.base import ModelSpec, Phase, Task, TaskData, Weights

__all__ = ["ModelSpec", "Phase", "Task", "TaskData", "Weights", "make_task", "with_frozen_settings"]


def make_task(cfg: Config) -> Task:
    # Each family's module is imported only for its runs (keeps image dependencies out of LM runs).
    if cfg.model.kind == "dit":
        from jaxgen.tasks.diffusion import DiffusionTask

        return DiffusionTask(cfg)
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

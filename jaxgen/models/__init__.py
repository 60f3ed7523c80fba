"""Model registry: `model.kind` in the config picks the constructor."""

from __future__ import annotations

from flax import nnx

from jaxgen.models.autoencoder import AutoencoderKL
from jaxgen.models.dit import DiT
from jaxgen.models.transformer import Transformer

MODELS = {"transformer": Transformer, "dit": DiT, "autoencoder": AutoencoderKL}


def build_model(cfg, rngs: nnx.Rngs) -> nnx.Module:
    return MODELS[cfg.kind](cfg, rngs)

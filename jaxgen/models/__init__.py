"""Model registry: `model.kind` in the config picks the constructor."""

from __future__ import annotations

from flax import nnx

from jaxgen.models.autoencoder import AutoencoderKL
from jaxgen.models.dit import DiT
from jaxgen.models.transformer import Transformer

MODELS = {"transformer": Transformer, "dit": DiT, "autoencoder": AutoencoderKL}


def build_model(cfg, rngs: nnx.Rngs) -> nnx.Module:
    # The bidirectional families are imported only for their runs.
    if cfg.kind == "encoder":
        from jaxgen.models.encoder import Encoder

        return Encoder(cfg, rngs)
    if cfg.kind == "encoder_decoder":
        from jaxgen.models.t5 import T5

        return T5(cfg, rngs)
    return MODELS[cfg.kind](cfg, rngs)

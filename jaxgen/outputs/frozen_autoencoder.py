"""A trained autoencoder, frozen, as latent diffusion's map between images and latents.

`load_autoencoder(RUN_DIR)` opens an autoencoder run (trained with `jaxgen train`
or imported from diffusers with `jaxgen import`) and returns a `FrozenAutoencoder`
whose `encode` and `decode` run on the host in fixed batches (the last one
padded), so each compiles once. The latent arithmetic (scaled posterior means,
the measured scale, the parameter digest) is diffusion/latents.py's.

Shape letters: N images, H W image side, C image channels, h w latent side, Z latent channels.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxgen.checkpoint import CheckpointError, read_step_meta
from jaxgen.checkpoint_layout import checkpoint_dir, committed_steps
from jaxgen.chunks import map_chunks
from jaxgen.config import AutoencoderConfig
from jaxgen.diffusion.latents import checked_scale, decode_latents, encode_latents, params_digest
from jaxgen.errors import ConfigError
from jaxgen.outputs.runs import load_run_config, open_run
from jaxgen.tasks.layout import MAIN_GROUP

BATCH = 64  # images per encode/decode call: one compiled shape

_encode_jit = jax.jit(encode_latents, static_argnums=0)
_decode_jit = jax.jit(decode_latents, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class FrozenAutoencoder:
    run_dir: pathlib.Path  # resolved
    step: int  # the checkpoint read
    cfg: AutoencoderConfig
    graphdef: nnx.GraphDef
    params: Any
    scale: float
    shift: float
    digest: str  # sha256 over every parameter's path, dtype, shape and bytes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(h, w, Z) of one image's latents."""
        return self.cfg.latent_size, self.cfg.latent_size, self.cfg.latent_channels

    def encode(self, images_NHWC: np.ndarray) -> np.ndarray:
        """Scaled latents (N, h, w, Z) float32 of images (N, H, W, C) in [-1, 1]."""
        return self._batched(_encode_jit, images_NHWC)

    def decode(self, latents_NhwZ: np.ndarray) -> np.ndarray:
        """Images (N, H, W, C) float32 in [-1, 1] of scaled latents."""
        return self._batched(_decode_jit, latents_NhwZ)

    def with_scale(self, scale: float) -> FrozenAutoencoder:
        return dataclasses.replace(self, scale=checked_scale(scale))

    def _batched(self, fn: Callable, x_N: np.ndarray) -> np.ndarray:
        return map_chunks(lambda chunk, _: fn(self.graphdef, self.params, chunk, self.scale, self.shift),
                          np.asarray(x_N, np.float32), BATCH)


def autoencoder_config(run_dir: str | pathlib.Path) -> AutoencoderConfig:
    """The model config of autoencoder run `run_dir`; any other kind of run is refused."""
    model = load_run_config(run_dir).model
    if model.kind != "autoencoder":
        raise ConfigError(f"run {str(run_dir)!r} trains model.kind={model.kind!r}; latent diffusion needs an "
                          "autoencoder run (model.kind: autoencoder, trained with jaxgen train or imported from "
                          "diffusers with jaxgen import)")
    return model


def load_autoencoder(run_dir: str | pathlib.Path, step: int | None = None,
                     scale: float | None = None) -> FrozenAutoencoder:
    """The frozen autoencoder of run `run_dir` (checkpoint `step`, default the newest); `scale` defaults to the
    run's model.scaling_factor, the shift is its model.shift_factor (none: 0)."""
    model = autoencoder_config(run_dir)
    run = open_run(run_dir, step)
    params = run.weights.params[MAIN_GROUP]
    return FrozenAutoencoder(run_dir=pathlib.Path(run_dir).resolve(), step=run.step, cfg=model,
                             graphdef=run.weights.graphdefs[MAIN_GROUP], params=params,
                             scale=checked_scale(model.scaling_factor if scale is None else scale),
                             shift=float(model.shift_factor or 0.0), digest=params_digest(params))


def frozen_in_run(run_dir: str | pathlib.Path) -> dict | None:
    """What the checkpoints of latent diffusion run `run_dir` record of the autoencoder it froze: its run
    directory, step, parameter digest and latent scale. None where the run has no checkpoint yet; {} where they
    were saved before jaxgen recorded it. Every checkpoint of a run records the same (the group is never
    trained): a damaged newest one is passed over, as training passes it over to resume from an older one."""
    directory = checkpoint_dir(pathlib.Path(run_dir))
    steps = committed_steps(directory)
    for step in reversed(steps):
        try:
            return dict(read_step_meta(directory, step).get("inputs", {}).get("autoencoder") or {})
        except CheckpointError:
            continue
    return {} if steps else None

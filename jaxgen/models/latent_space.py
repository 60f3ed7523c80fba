"""A frozen autoencoder as the space a latent DiT works in, and the scale of that space.

`LatentSpace` holds an autoencoder (a jaxgen autoencoder run's or an imported
diffusers AutoencoderKL's parameters) and the scale and shift of its latents:
a latent is (posterior mean - shift) x scale, so that the latents of the
training images have unit variance (Rombach et al. 2022's scale factor,
measured from the data). It is a frozen model group of the run: checkpoints
carry it, so samples decode through exactly the autoencoder and scale the
DiT was trained on, even after the autoencoder's run trains on, moves or is
gone (the run's config.yaml keeps the autoencoder's settings).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LatentSpace(nnx.Module):
    def __init__(self, autoencoder: nnx.Module, scale: float, shift: float):
        self.autoencoder = autoencoder
        self.scale = nnx.Param(jnp.asarray(scale, jnp.float32), out_sharding=())
        self.shift = nnx.Param(jnp.asarray(shift, jnp.float32), out_sharding=())

    def encode(self, images_BHWC: jax.Array) -> jax.Array:
        """Images in [-1, 1] -> scaled latents (B, h, w, Z): the posterior mean, deterministic."""
        mean_BhwZ, _ = self.autoencoder.encode(images_BHWC)
        return (mean_BhwZ - self.shift[...]) * self.scale[...]

    def decode(self, latents_BhwZ: jax.Array) -> jax.Array:
        """Scaled latents -> images in [-1, 1]."""
        images = self.autoencoder.decode(latents_BhwZ / self.scale[...] + self.shift[...])
        return jnp.clip(images, -1.0, 1.0)

"""Latent diffusion's arithmetic: scaled latents of a frozen autoencoder, their scale, and its digest.

A diffusion model sees scaled latents, z = (posterior mean - shift) * scale: the
mean, not a sample, so an image always has the same latent and a cached latent
dataset is exact. Stable Diffusion's convention fixes the scale: 1 / the standard
deviation of the unscaled latents of the training images (`measure_scale`), so
that the latents have unit variance as the noise does; an imported SD VAE brings
its own (`model.scaling_factor`). `params_digest` names exact parameters, so a
latent dataset can be checked against the autoencoder that wrote it. Opening an
autoencoder run is outputs/frozen_autoencoder.py's.

Shape letters: N images, H W image side, C image channels, h w latent side, Z latent channels.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.errors import ConfigError, DataError


def encode_latents(graphdef: nnx.GraphDef, params: Any, x_NHWC: jax.Array, scale: jax.Array | float,
                   shift: jax.Array | float) -> jax.Array:
    """Images in [-1, 1] -> scaled latents (N, h, w, Z): (posterior mean - shift) * scale."""
    mean_NhwZ, _ = nnx.merge(graphdef, params).encode(x_NHWC)
    return (mean_NhwZ - shift) * scale


def decode_latents(graphdef: nnx.GraphDef, params: Any, z_NhwZ: jax.Array, scale: jax.Array | float,
                   shift: jax.Array | float) -> jax.Array:
    """Scaled latents -> images (N, H, W, C) clipped to [-1, 1]."""
    images_NHWC = nnx.merge(graphdef, params).decode(z_NhwZ / scale + shift)
    return jnp.clip(images_NHWC, -1.0, 1.0)


def params_digest(params: Any) -> str:
    sha256 = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        array = np.asarray(jax.device_get(leaf))
        sha256.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}\n".encode())
        sha256.update(np.ascontiguousarray(array).tobytes())
    return sha256.hexdigest()


def measure_scale(latents: np.ndarray) -> float:
    """1 / the standard deviation of unscaled latents over all their numbers: the scale that gives them unit
    variance (Stable Diffusion's convention)."""
    std = float(np.std(np.asarray(latents, np.float64)))
    if not (math.isfinite(std) and std > 0):
        raise DataError(f"the autoencoder's latents of the training images have standard deviation {std}; no "
                        "scale gives them unit variance (is the autoencoder trained, and are the images varied?)")
    return 1.0 / std


def checked_scale(scale: float) -> float:
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"latent scale {scale} is not a positive finite number")
    return float(scale)

"""Classifier-free guidance (Ho & Salimans 2022): one model, trained with some
labels (or captions) replaced by a null class (the null caption), predicts both
conditionally and unconditionally. The unconditional input may also be a
negative prompt: guidance then pushes away from what it describes.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def drop_labels(labels_B: jax.Array, rng: jax.Array, prob: float, null_label: int) -> jax.Array:
    """Replace each label by the null class with probability `prob`."""
    drop_B = jax.random.bernoulli(rng, prob, labels_B.shape)
    return jnp.where(drop_B, null_label, labels_B)


def drop_captions(keep_B: jax.Array, rng: jax.Array, prob: float) -> jax.Array:
    """Each caption's `keep` flag, turned off (the null caption) with probability `prob`."""
    return keep_B & ~jax.random.bernoulli(rng, prob, keep_B.shape)


def guided(model_fn: Callable, scale: jax.Array, guided_channels: int) -> Callable:
    """(x, t, condition, unconditional) -> output pushed away from the unconditional prediction.

    cond + (scale - 1) (cond - uncond): scale 1 is exactly the conditional
    prediction, 0 the unconditional one; `scale` is a scalar or one per
    image. The conditions are pytrees with a leading batch axis (labels and
    null labels; captions and null or negative captions); both halves run as
    one batch. Only the first `guided_channels` are guided; any
    learned-variance channels after them are taken from the conditional
    prediction.
    """

    def denoise(x_BHWC: jax.Array, t_B: jax.Array, condition, unconditional) -> jax.Array:
        both = model_fn(
            jnp.concatenate([x_BHWC, x_BHWC]), jnp.concatenate([t_B, t_B]),
            jax.tree.map(lambda c, u: jnp.concatenate([c, u]), condition, unconditional),
        )
        cond, uncond = jnp.split(both, 2)
        g = guided_channels
        scale_B = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), t_B.shape).reshape(-1, 1, 1, 1)
        pushed = cond[..., :g] + (scale_B - 1) * (cond[..., :g] - uncond[..., :g])
        return jnp.concatenate([pushed, cond[..., g:]], axis=-1)

    return denoise

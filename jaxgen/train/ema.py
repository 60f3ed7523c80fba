"""Exponential moving average of parameters, for sampling and evaluation.

Diffusion models sample markedly better from an average of recent weights than
from the last iterate. The decay ramps up from zero so that the average does
not carry the random initialisation along for thousands of steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_decay(step: jax.Array, decay: float, warmup: int) -> jax.Array:
    """Decay for the update after `step` optimizer updates: linear from 0 to `decay` over `warmup` steps."""
    ramp = jnp.minimum(jnp.asarray(step, jnp.float32) / max(warmup, 1), 1.0) if warmup else 1.0
    return decay * ramp


def ema_update(ema_params, params, step: jax.Array, decay: float, warmup: int):
    """ema + (1 - d) (params - ema), in float32, stored in each EMA leaf's dtype.

    `step` counts the updates applied so far including the one that produced
    `params` (1 after the first). Pure: a train step calls it after the
    optimizer update.
    """
    d = ema_decay(step, decay, warmup)
    return jax.tree.map(
        lambda e, p: (e.astype(jnp.float32) + (1 - d) * (p.astype(jnp.float32) - e.astype(jnp.float32))).astype(e.dtype),
        ema_params, params,
    )

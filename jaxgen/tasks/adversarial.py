"""The losses of adversarial training, as pure functions of discriminator scores (logits, real > fake).

Per-image values: a PatchGAN's scores are averaged over its patches first.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def per_image(scores: jax.Array) -> jax.Array:
    """(B,) from scores (B,) or patch scores (B, h, w)."""
    return scores.reshape(scores.shape[0], -1).mean(axis=-1)


def discriminator_loss(kind: str, real: jax.Array, fake: jax.Array) -> jax.Array:
    """Per image: hinge max(0, 1 - D(x)) + max(0, 1 + D(G)); non-saturating softplus(-D(x)) + softplus(D(G))."""
    if kind == "hinge":
        return per_image(jax.nn.relu(1.0 - real)) + per_image(jax.nn.relu(1.0 + fake))
    return per_image(jax.nn.softplus(-real)) + per_image(jax.nn.softplus(fake))


def generator_loss(kind: str, fake: jax.Array) -> jax.Array:
    """Per image: hinge -D(G); non-saturating softplus(-D(G)) = -log sigmoid(D(G))."""
    if kind == "hinge":
        return per_image(-fake)
    return per_image(jax.nn.softplus(-fake))


def r1_penalty(score_fn: Callable[[jax.Array], jax.Array], real: jax.Array) -> jax.Array:
    """Per image |grad_x D(x)|^2 at real images (each image's score depends on that image alone)."""
    grads = jax.grad(lambda x: jnp.sum(per_image(score_fn(x))))(real)
    return jnp.sum(jnp.square(grads.astype(jnp.float32)).reshape(real.shape[0], -1), axis=-1)


def adaptive_weight(reconstruction_grad: jax.Array, adversarial_grad: jax.Array, max_weight: float) -> jax.Array:
    """|grad rec| / (|grad adv| + 1e-4) at the generator's last layer, clipped to [0, max_weight], held constant.

    Balances the two terms so the adversarial one neither swamps the reconstruction nor
    vanishes (Esser et al. 2021, eq. 7).
    """
    ratio = jnp.linalg.norm(reconstruction_grad) / (jnp.linalg.norm(adversarial_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))

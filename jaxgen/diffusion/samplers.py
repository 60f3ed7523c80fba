"""Samplers: DDPM ancestral and DDIM for eps/v models, Euler and Heun for flow models.

Each takes `denoise(x, t_B) -> model output` (times in the objective's units,
guidance already applied), the starting noise and a key; noise for step i is
drawn from fold_in(key, i), so a seed fixes the result whatever the batch
contents. DDPM-family samplers walk any number of steps through an evenly
spaced subset of the schedule; the predicted x0 is clipped to the data range
[-1, 1] at each step when the data are pixels (`clip`); latents have no range
and are never clipped.

Shape letters: B batch, H W C image.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.config import MAX_FLOW_STEPS, DiffusionConfig
from jaxgen.diffusion.guidance import guided
from jaxgen.diffusion.objectives import (
    Objective,
    eps_from_x0,
    learned_log_var,
    posterior_log_var,
    posterior_mean,
)
from jaxgen.diffusion.schedules import spaced_timesteps

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]

FLOW_SAMPLERS, DDPM_SAMPLERS = ("euler", "heun"), ("ddpm", "ddim")


def samplers_for(objective: str) -> tuple[str, ...]:
    return FLOW_SAMPLERS if objective == "flow" else DDPM_SAMPLERS


def max_sample_steps(cfg: DiffusionConfig) -> int:
    return MAX_FLOW_STEPS if cfg.objective == "flow" else cfg.timesteps


def _ddpm_family_step(denoise: Denoiser, objective: Objective, steps: int, clip: bool = True):
    """Shared set-up: the step indices and, per loop position, (t, a, a_prev, x0, eps, frac)."""
    ts = jnp.asarray(spaced_timesteps(objective.timesteps, steps), jnp.float32)
    prev = jnp.concatenate([jnp.array([-1.0]), ts[:-1]])  # -1: past the last step, alpha_bar = 1

    def predict(i: jax.Array, x: jax.Array):
        b = x.shape[0]
        t_B, prev_B = jnp.full((b,), ts[i]), jnp.full((b,), prev[i])
        a, a_prev = objective.alpha_bar(t_B), objective.alpha_bar(prev_B)
        pred, frac = objective.split(denoise(x, t_B))
        x0, _ = objective.x0_eps(pred, x, a)
        x0 = jnp.clip(x0, -1.0, 1.0) if clip else x0
        return a, a_prev, x0, eps_from_x0(x, x0, a), frac

    return predict


def ddpm_sample(denoise: Denoiser, objective: Objective, x_BHWC: jax.Array, steps: int, rng: jax.Array,
                clip: bool = True) -> jax.Array:
    """Ancestral sampling from the posterior; learned variance when the model has it, else beta~."""
    predict = _ddpm_family_step(denoise, objective, steps, clip)

    def body(k, x):
        i = steps - 1 - k
        a, a_prev, x0, _, frac = predict(i, x)
        mean = posterior_mean(x0, x, a, a_prev)
        log_var = posterior_log_var(a, a_prev) if frac is None else learned_log_var(frac, a, a_prev)
        z = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
        return mean + jnp.where(i > 0, jnp.exp(0.5 * log_var), 0.0) * z

    return jax.lax.fori_loop(0, steps, body, x_BHWC)


def ddim_sample(denoise: Denoiser, objective: Objective, x_BHWC: jax.Array, steps: int, eta: float,
                rng: jax.Array, clip: bool = True) -> jax.Array:
    """Song et al. 2021: eta 0 is deterministic; eta 1 draws the same distribution as DDPM."""
    predict = _ddpm_family_step(denoise, objective, steps, clip)

    def body(k, x):
        i = steps - 1 - k
        a, a_prev, x0, eps, _ = predict(i, x)
        sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        z = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0)) * eps + sigma * z

    return jax.lax.fori_loop(0, steps, body, x_BHWC)


def flow_sample(denoise: Denoiser, x_BHWC: jax.Array, steps: int, second_order: bool) -> jax.Array:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 (data) in equal steps.

    Euler takes one model call per step; Heun averages the slopes at both ends
    of the step (two calls; the last step, ending at t = 0, stays Euler).
    """

    def body(k, x):
        b = x.shape[0]
        t, t_next = 1.0 - k / steps, 1.0 - (k + 1) / steps
        v = denoise(x, jnp.full((b,), t))
        x_euler = x + (t_next - t) * v
        if not second_order:
            return x_euler
        v_next = denoise(x_euler, jnp.full((b,), t_next))
        x_heun = x + (t_next - t) * 0.5 * (v + v_next)
        return jnp.where(k < steps - 1, x_heun, x_euler)

    return jax.lax.fori_loop(0, steps, body, x_BHWC)


def make_sampler(graphdef: nnx.GraphDef, objective: Objective, cfg: DiffusionConfig,
                 image_shape: tuple[int, int, int], clip: bool = True) -> Callable:
    """Jitted `(params, condition, unconditional, rng, guidance_scale) -> images (B, H, W, C)`, in [-1, 1] when `clip`:
    the conditions are the model's (labels, captions) with a leading batch axis of B."""

    def sample(params: dict, condition, unconditional, rng: jax.Array, scale: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)

        def model_fn(x, t_B, c):
            return model(x, objective.model_time(t_B), c)

        noise_rng, step_rng = jax.random.split(rng)
        b = jax.tree.leaves(condition)[0].shape[0]
        x_BHWC = jax.random.normal(noise_rng, (b, *image_shape))

        def denoise(x, t_B):
            # Guidance only inside the configured noise interval (Kynkaanniemi et al. 2024): at the
            # noisiest levels it mostly removes diversity, at the cleanest it does little.
            lo, hi = cfg.guidance_interval
            level = objective.noise_level(t_B)
            scale_B = jnp.where((level >= lo) & (level <= hi), scale, 1.0)
            return guided(model_fn, scale_B, objective.channels)(x, t_B, condition, unconditional)

        if cfg.sampler == "ddpm":
            x_BHWC = ddpm_sample(denoise, objective, x_BHWC, cfg.sample_steps, step_rng, clip)
        elif cfg.sampler == "ddim":
            x_BHWC = ddim_sample(denoise, objective, x_BHWC, cfg.sample_steps, cfg.ddim_eta, step_rng, clip)
        else:
            x_BHWC = flow_sample(denoise, x_BHWC, cfg.sample_steps, second_order=cfg.sampler == "heun")
        return jnp.clip(x_BHWC, -1.0, 1.0) if clip else x_BHWC

    return jax.jit(sample)

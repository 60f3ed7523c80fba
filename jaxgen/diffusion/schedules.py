"""Noise schedules (DDPM) and training-time distributions (rectified flow).

A DDPM schedule is the table alpha_bar[t], t = 0..T-1: the fraction of signal
variance left after t+1 noising steps, so x_t = sqrt(alpha_bar) x0 +
sqrt(1 - alpha_bar) eps. Tables are computed in float64 and stored in float32.
"""

from __future__ import annotations

import jax
import numpy as np


def linear_alpha_bars(timesteps: int) -> np.ndarray:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 at T=1000, rescaled so other T keep the same total noise."""
    scale = 1000 / timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas).astype(np.float32)


def cosine_alpha_bars(timesteps: int, offset: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal 2021: alpha_bar follows cos^2; betas capped at 0.999 so the last step stays finite."""
    f = np.cos((np.arange(timesteps + 1, dtype=np.float64) / timesteps + offset) / (1 + offset) * np.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1.0 - betas).astype(np.float32)


SCHEDULES = {"linear": linear_alpha_bars, "cosine": cosine_alpha_bars}


def alpha_bars(kind: str, timesteps: int) -> np.ndarray:
    return SCHEDULES[kind](timesteps)


def flow_times(rng: jax.Array, n: int, kind: str, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """(n,) training times in (0, 1) for rectified flow; t = 1 is pure noise.

    Logit-normal (Esser et al. 2024) spends more steps at middle times, where
    the velocity is hardest to predict, than the uniform distribution does.
    """
    if kind == "uniform":
        return jax.random.uniform(rng, (n,), minval=1e-5, maxval=1.0)
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (n,)))


def spaced_timesteps(timesteps: int, steps: int) -> np.ndarray:
    """`steps` DDPM indices evenly spread over 0..T-1, ascending; sampling always starts at T-1 (pure noise)."""
    if steps > timesteps:
        raise ValueError(f"cannot sample in {steps} steps from a {timesteps}-step schedule")
    return np.round(np.linspace(timesteps - 1, 0, steps))[::-1].astype(np.int32)

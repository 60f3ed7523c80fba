"""Training objectives: how images are noised and what the model must predict.

DDPM (eps or v prediction) works on integer steps t = 0..T-1 with
x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = alpha_bar[t]. Rectified flow works on
t in (0, 1) with x_t = (1 - t) x0 + t eps and predicts the velocity eps - x0.
Training, held-out evaluation and the samplers all go through this module, so
they cannot disagree about a parameterisation.

Shape letters: B batch, H W C image height, width, channels. Per-image
scalars are broadcast as (B, 1, 1, 1) and named `a`, `t`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import Config
from jaxgen.diffusion.schedules import alpha_bars, flow_times

# ----------------------------------------------------------------------------- conversions


def x0_from_eps(x_t: jax.Array, eps: jax.Array, a: jax.Array) -> jax.Array:
    return (x_t - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)


def eps_from_x0(x_t: jax.Array, x0: jax.Array, a: jax.Array) -> jax.Array:
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)


def v_from_x0_eps(x0: jax.Array, eps: jax.Array, a: jax.Array) -> jax.Array:
    """Salimans & Ho 2022: v = sqrt(a) eps - sqrt(1 - a) x0, bounded at every noise level."""
    return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0


def x0_eps_from_v(x_t: jax.Array, v: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
    sa, s1a = jnp.sqrt(a), jnp.sqrt(1 - a)
    return sa * x_t - s1a * v, s1a * x_t + sa * v


# ----------------------------------------------------------------------------- DDPM posterior


def posterior_log_var(a: jax.Array, a_prev: jax.Array) -> jax.Array:
    """log beta~, the variance of q(x_prev | x_t, x0); floored because it is zero at the first step."""
    var = (1 - a / a_prev) * (1 - a_prev) / (1 - a)
    return jnp.log(jnp.maximum(var, 1e-20))


def posterior_mean(x0: jax.Array, x_t: jax.Array, a: jax.Array, a_prev: jax.Array) -> jax.Array:
    """Mean of q(x_prev | x_t, x0) between two (possibly non-adjacent) steps."""
    beta = 1 - a / a_prev
    return (jnp.sqrt(a_prev) * beta * x0 + jnp.sqrt(1 - beta) * (1 - a_prev) * x_t) / (1 - a)


def learned_log_var(frac: jax.Array, a: jax.Array, a_prev: jax.Array) -> jax.Array:
    """Improved DDPM: the model interpolates log-variance between beta~ (frac -1) and beta (frac +1)."""
    w = (frac + 1) / 2
    return w * jnp.log(1 - a / a_prev) + (1 - w) * posterior_log_var(a, a_prev)


def gaussian_kl(mean1, log_var1, mean2, log_var2) -> jax.Array:
    return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * jnp.exp(-log_var2))


# ----------------------------------------------------------------------------- objective


def _per_image(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _bcast(s_B: jax.Array) -> jax.Array:
    return s_B.reshape(-1, 1, 1, 1)


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    kind: str  # "eps", "v" or "flow"
    channels: int  # image channels; the model may output twice as many (learned variance)
    learn_sigma: bool = False
    alpha_bars: np.ndarray | None = None  # DDPM only, (T,)
    flow_time: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    vlb_weight: float = 1.0

    @property
    def is_flow(self) -> bool:
        return self.kind == "flow"

    @property
    def timesteps(self) -> int:
        return len(self.alpha_bars)

    def train_times(self, rng: jax.Array, n: int) -> jax.Array:
        """(n,) float32 times: DDPM step indices, or flow times in (0, 1)."""
        if self.is_flow:
            return flow_times(rng, n, self.flow_time, self.logit_mean, self.logit_std)
        return jax.random.randint(rng, (n,), 0, self.timesteps).astype(jnp.float32)

    def eval_times(self, k: int, rows: int) -> np.ndarray:
        """Row i's time of k evenly spaced ones (the midpoints of k equal bins of the time range): bin i mod k.

        Only the rows' own times are made, so a k larger than the rows costs nothing."""
        mids = (np.arange(rows) % k + 0.5) / k
        return (mids if self.is_flow else np.floor(mids * self.timesteps)).astype(np.float32)

    def noise_level(self, t_B: jax.Array) -> jax.Array:
        """Times as a fraction of the way from data (0) to pure noise (1)."""
        return t_B if self.is_flow else t_B / (self.timesteps - 1)

    def model_time(self, t_B: jax.Array) -> jax.Array:
        """Times on the 0..1000 scale the DiT's timestep features are tuned for."""
        return t_B * 1000.0 if self.is_flow else t_B * (1000.0 / self.timesteps)

    def alpha_bar(self, t_B: jax.Array) -> jax.Array:
        """(B, 1, 1, 1) alpha_bar at DDPM step indices; index -1 means 'before any noise' (1.0)."""
        table = jnp.concatenate([jnp.asarray(self.alpha_bars), jnp.ones((1,), jnp.float32)])
        return _bcast(table[t_B.astype(jnp.int32)])

    def noisy(self, x0: jax.Array, eps: jax.Array, t_B: jax.Array) -> jax.Array:
        if self.is_flow:
            t = _bcast(t_B)
            return (1 - t) * x0 + t * eps
        a = self.alpha_bar(t_B)
        return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps

    def target(self, x0: jax.Array, eps: jax.Array, t_B: jax.Array) -> jax.Array:
        if self.kind == "flow":
            return eps - x0
        if self.kind == "v":
            return v_from_x0_eps(x0, eps, self.alpha_bar(t_B))
        return eps

    def split(self, out: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Model output -> (prediction, variance fraction in [-1, 1] or None)."""
        if not self.learn_sigma:
            return out, None
        return out[..., : self.channels], jnp.tanh(out[..., self.channels:])

    def x0_eps(self, pred: jax.Array, x_t: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
        """DDPM: the model's eps or v prediction as (x0, eps)."""
        if self.kind == "v":
            return x0_eps_from_v(x_t, pred, a)
        return x0_from_eps(x_t, pred, a), pred

    def loss_per_image(self, out: jax.Array, x0: jax.Array, eps: jax.Array, t_B: jax.Array) -> jax.Array:
        """(B,) mean squared error of the prediction, plus the variational term when the variance is learned."""
        pred, frac = self.split(out)
        loss_B = _per_image(jnp.square(pred - self.target(x0, eps, t_B)))
        if frac is None:
            return loss_B
        # The variational bound trains only the variance: the mean is held fixed
        # (Nichol & Dhariwal 2021), so the MSE term alone shapes the mean.
        a, a_prev = self.alpha_bar(t_B), self.alpha_bar(t_B - 1)
        x_t = self.noisy(x0, eps, t_B)
        x0_hat, _ = self.x0_eps(jax.lax.stop_gradient(pred), x_t, a)
        true_mean, true_log_var = posterior_mean(x0, x_t, a, a_prev), posterior_log_var(a, a_prev)
        model_mean = posterior_mean(x0_hat, x_t, a, a_prev)
        kl_B = _per_image(gaussian_kl(true_mean, true_log_var, model_mean, learned_log_var(frac, a, a_prev)))
        # The first step's posterior has no variance to match.
        return loss_B + self.vlb_weight * jnp.where(t_B > 0, kl_B / math.log(2.0), 0.0)


def make_objective(cfg: Config) -> Objective:
    d = cfg.diffusion
    return Objective(
        kind=d.objective, channels=cfg.model.channels, learn_sigma=cfg.model.learn_sigma,
        alpha_bars=None if d.objective == "flow" else alpha_bars(d.schedule, d.timesteps),
        flow_time=d.flow_time, logit_mean=d.logit_mean, logit_std=d.logit_std, vlb_weight=d.vlb_weight,
    )

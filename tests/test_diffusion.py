"""Diffusion math: schedules, parameterisations, guidance, samplers, EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgen.config import Config
from jaxgen.diffusion import samplers
from jaxgen.diffusion.guidance import drop_labels, guided
from jaxgen.diffusion.objectives import (
    Objective,
    eps_from_x0,
    posterior_log_var,
    posterior_mean,
    v_from_x0_eps,
    x0_eps_from_v,
    x0_from_eps,
)
from jaxgen.diffusion.samplers import make_sampler
from jaxgen.diffusion.schedules import alpha_bars, flow_times, spaced_timesteps
from jaxgen.train.ema import ema_decay, ema_update


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [1000, 50])
def test_schedules_decrease_from_almost_clean_to_almost_pure_noise(kind, timesteps):
    a = alpha_bars(kind, timesteps)
    assert a.shape == (timesteps,) and a.dtype == np.float32
    assert np.all(np.diff(a) < 0)
    assert 0.98 < a[0] < 1.0
    assert 0.0 < a[-1] < 1e-3


def test_flow_times_lie_in_the_open_unit_interval_and_logit_normal_centres():
    uniform = np.asarray(flow_times(jax.random.PRNGKey(0), 20_000, "uniform"))
    logit = np.asarray(flow_times(jax.random.PRNGKey(0), 20_000, "logit_normal", 0.0, 1.0))
    for t in (uniform, logit):
        assert 0 < t.min() and t.max() < 1
    assert abs(uniform.mean() - 0.5) < 0.01 and uniform.std() > 0.28
    assert abs(np.median(logit) - 0.5) < 0.01 and logit.std() < 0.22


def test_spaced_timesteps_start_at_pure_noise():
    assert spaced_timesteps(1000, 1).tolist() == [999]
    ts = spaced_timesteps(1000, 10)
    assert ts[0] == 0 and ts[-1] == 999 and np.all(np.diff(ts) > 0)


def test_eps_x0_v_conversions_round_trip():
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 4, 8, 8, 1))
    a = jnp.asarray(rng.uniform(0.01, 0.99, (4, 1, 1, 1)))
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
    np.testing.assert_allclose(x0_from_eps(x_t, eps, a), x0, atol=1e-5)
    np.testing.assert_allclose(eps_from_x0(x_t, x0, a), eps, atol=1e-5)
    x0_back, eps_back = x0_eps_from_v(x_t, v_from_x0_eps(x0, eps, a), a)
    np.testing.assert_allclose(x0_back, x0, atol=1e-5)
    np.testing.assert_allclose(eps_back, eps, atol=1e-5)


def test_dropped_labels_map_to_the_null_class():
    labels = jnp.arange(10_000) % 10
    dropped = drop_labels(labels, jax.random.PRNGKey(0), 0.25, null_label=10)
    changed = dropped != labels
    assert np.all(np.asarray(dropped)[np.asarray(changed)] == 10)
    assert abs(float(changed.mean()) - 0.25) < 0.02
    np.testing.assert_array_equal(drop_labels(labels, jax.random.PRNGKey(0), 0.0, 10), labels)
    assert np.all(np.asarray(drop_labels(labels, jax.random.PRNGKey(0), 1.0, 10)) == 10)


def toy_model(x, t, y):
    """Depends on the label, so conditional and unconditional outputs differ; 2 output channels."""
    out = jnp.tanh(x * (1 + y[:, None, None, None]) + 0.001 * t[:, None, None, None])
    return jnp.concatenate([out, -out], axis=-1)


def test_guidance_at_scale_one_is_the_conditional_prediction():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 1))
    t, y = jnp.array([1.0, 50.0, 900.0]), jnp.array([0, 3, 7])
    cond = toy_model(x, t, y)
    null = jnp.full((3,), 10)
    np.testing.assert_array_equal(guided(toy_model, 1.0, guided_channels=1)(x, t, y, null), cond)
    uncond = toy_model(x, t, null)
    np.testing.assert_allclose(guided(toy_model, 0.0, 1)(x, t, y, null)[..., :1], uncond[..., :1], atol=1e-6)
    pushed = guided(toy_model, 3.0, 1)(x, t, y, null)
    np.testing.assert_allclose(pushed[..., :1], uncond[..., :1] + 3 * (cond - uncond)[..., :1], atol=1e-5)
    np.testing.assert_array_equal(pushed[..., 1:], cond[..., 1:])  # variance channels are not guided
    # One scale per image, as the sampler's guidance interval uses: scale 1 rows stay conditional.
    mixed = guided(toy_model, jnp.array([1.0, 3.0, 1.0]), 1)(x, t, y, null)
    np.testing.assert_array_equal(mixed[0], cond[0])
    np.testing.assert_allclose(mixed[1], pushed[1], atol=1e-6)


# ----------------------------------------------------------------------------- samplers

# Compiled whole: the samplers' Python-level set-up would otherwise run op by op.
ddim_sample = jax.jit(samplers.ddim_sample, static_argnums=(0, 1, 3, 4))
ddpm_sample = jax.jit(samplers.ddpm_sample, static_argnums=(0, 1, 3))
flow_sample = jax.jit(samplers.flow_sample, static_argnums=(0, 2, 3))

POINT = jnp.linspace(-0.8, 0.8, 16).reshape(1, 4, 4, 1)  # a one-image data distribution


def ddpm_objective(kind):
    return Objective(kind=kind, channels=1, alpha_bars=alpha_bars("cosine", 100))


def oracle(objective):
    """The exact prediction for data that is always POINT."""

    def denoise(x, t_B):
        if objective.is_flow:
            t = t_B.reshape(-1, 1, 1, 1)
            return (x - POINT) / t  # eps - x0 with eps = (x - (1 - t) x0) / t
        a = objective.alpha_bar(t_B)
        eps = eps_from_x0(x, POINT, a)
        return v_from_x0_eps(POINT, eps, a) if objective.kind == "v" else eps

    return denoise


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("steps", [50, 7])
def test_ddim_and_ddpm_with_a_perfect_model_land_on_the_data(kind, steps):
    objective = ddpm_objective(kind)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 1))
    ddim = ddim_sample(oracle(objective), objective, x_T, steps, 0.0, jax.random.PRNGKey(1))
    ddpm = ddpm_sample(oracle(objective), objective, x_T, steps, jax.random.PRNGKey(1))
    np.testing.assert_allclose(ddim, jnp.broadcast_to(POINT, x_T.shape), atol=1e-4)
    np.testing.assert_allclose(ddpm, jnp.broadcast_to(POINT, x_T.shape), atol=1e-4)


@pytest.mark.parametrize("second_order", [False, True])
def test_flow_samplers_with_a_perfect_model_land_on_the_data(second_order):
    objective = Objective(kind="flow", channels=1)
    x_1 = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 1))
    out = flow_sample(oracle(objective), x_1, 6, second_order)
    np.testing.assert_allclose(out, jnp.broadcast_to(POINT, x_1.shape), atol=1e-5)


def test_ddim_with_eta_one_is_ddpm_ancestral_sampling():
    objective = ddpm_objective("eps")
    model = lambda x, t_B: 0.5 * jnp.tanh(x) + 0.001 * t_B.reshape(-1, 1, 1, 1)  # imperfect on purpose
    x_T = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 1))
    ddim = ddim_sample(model, objective, x_T, 20, 1.0, jax.random.PRNGKey(5))
    ddpm = ddpm_sample(model, objective, x_T, 20, jax.random.PRNGKey(5))
    np.testing.assert_allclose(ddim, ddpm, atol=1e-5)
    assert not np.allclose(ddim, ddim_sample(model, objective, x_T, 20, 0.0, jax.random.PRNGKey(5)), atol=1e-3)


def test_posterior_of_adjacent_steps_matches_ddpm_formulas():
    a = alpha_bars("linear", 1000)
    t = 500
    beta = 1 - a[t] / a[t - 1]
    x0, x_t = np.float32(0.3), np.float32(-0.7)
    mean = posterior_mean(x0, x_t, a[t], a[t - 1])
    # Ho et al. 2020, eq. 7.
    expected = np.sqrt(a[t - 1]) * beta / (1 - a[t]) * x0 + np.sqrt(1 - beta) * (1 - a[t - 1]) / (1 - a[t]) * x_t
    np.testing.assert_allclose(mean, expected, rtol=1e-5)
    np.testing.assert_allclose(np.exp(posterior_log_var(a[t], a[t - 1])), (1 - a[t - 1]) / (1 - a[t]) * beta, rtol=1e-4)


# ----------------------------------------------------------------------------- EMA


def test_ema_decay_warms_up_linearly_then_holds():
    assert float(ema_decay(0, 0.99, 100)) == 0.0
    np.testing.assert_allclose(float(ema_decay(50, 0.99, 100)), 0.495, rtol=1e-6)
    assert float(ema_decay(100, 0.99, 100)) == pytest.approx(0.99) == float(ema_decay(10_000, 0.99, 100))
    assert float(ema_decay(1, 0.99, 0)) == pytest.approx(0.99)


def test_ema_update_averages_towards_the_parameters():
    ema = {"w": jnp.zeros((3,)), "b": {"x": jnp.full((2,), 4.0, jnp.bfloat16)}}
    params = {"w": jnp.ones((3,)), "b": {"x": jnp.zeros((2,), jnp.bfloat16)}}
    new = ema_update(ema, params, step=200, decay=0.9, warmup=100)
    np.testing.assert_allclose(new["w"], 0.1, rtol=1e-6)
    assert new["b"]["x"].dtype == jnp.bfloat16
    np.testing.assert_allclose(new["b"]["x"].astype(jnp.float32), 3.6, rtol=1e-2)
    # A constant parameter sequence is a fixed point; the first update copies the parameters.
    assert ema_update(params, params, 5, 0.9, 10)["w"].tolist() == [1.0] * 3
    np.testing.assert_array_equal(ema_update(ema, params, 0, 0.9, 10)["w"], params["w"])
    # Closed form: n updates at a constant decay d from e0 towards p leave d^n (e0 - p).
    e = ema
    for step in range(100, 110):
        e = ema_update(e, params, step, 0.9, 100)
    np.testing.assert_allclose(e["w"], 1 - 0.9**10, rtol=1e-5)


def test_learned_variance_term_trains_only_the_variance_and_skips_the_first_step():
    objective = Objective(kind="eps", channels=1, learn_sigma=True, alpha_bars=alpha_bars("linear", 100))
    rng = np.random.default_rng(0)
    out, x0, eps = (jnp.asarray(rng.standard_normal((4, 4, 4, c)), jnp.float32) for c in (2, 1, 1))
    t = jnp.array([0.0, 10.0, 50.0, 99.0])
    grad = jax.grad(lambda o: objective.loss_per_image(o, x0, eps, t).sum())(out)
    # The mean channel sees only the MSE: d/dpred mean((pred - eps)^2) = 2 (pred - eps) / pixels.
    np.testing.assert_allclose(grad[..., :1], 2 * (out[..., :1] - eps) / 16, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad[0, ..., 1]) == 0)
    assert np.all(np.abs(np.asarray(grad[1:, ..., 1])).max(axis=(1, 2)) > 0)


def test_ddpm_with_learned_variance_still_lands_on_the_data():
    objective = Objective(kind="eps", channels=1, learn_sigma=True, alpha_bars=alpha_bars("cosine", 100))
    exact = oracle(Objective(kind="eps", channels=1, alpha_bars=objective.alpha_bars))
    denoise = lambda x, t_B: jnp.concatenate([exact(x, t_B), jnp.full_like(x, 0.5)], axis=-1)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 1))
    out = ddpm_sample(denoise, objective, x_T, 10, jax.random.PRNGKey(1))
    np.testing.assert_allclose(out, jnp.broadcast_to(POINT, x_T.shape), atol=1e-4)


class ConstantVelocity(nnx.Module):
    """A flow model whose velocity is -5 everywhere: integrating from t=1 to 0 adds 5 to the noise."""

    def __call__(self, x, t, condition):
        return jnp.full_like(x, -5.0)


def test_pixel_samples_are_clipped_to_the_data_range_and_latent_samples_are_not():
    from jaxgen.config import DiffusionConfig
    from jaxgen.diffusion.objectives import make_objective

    cfg = DiffusionConfig(objective="flow", sampler="euler", sample_steps=4)
    objective = make_objective(Config(model={"kind": "dit", "image_size": 8, "channels": 1},
                                      diffusion=cfg.model_dump()))
    graphdef, params = nnx.split(ConstantVelocity())
    labels = jnp.zeros((3,), jnp.int32)
    args = (nnx.to_pure_dict(params), labels, labels, jax.random.PRNGKey(0), jnp.float32(1.0))
    pixels = make_sampler(graphdef, objective, cfg, (4, 4, 1), clip=True)(*args)
    latents = make_sampler(graphdef, objective, cfg, (4, 4, 1), clip=False)(*args)
    assert float(jnp.max(jnp.abs(pixels))) <= 1.0 and float(jnp.min(latents)) > 1.0

"""bfloat16 compute with float32 parameters: the matmuls really run in bf16, and training matches f32."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.data.pipeline import to_global
from jaxgen.data.lm import train_batches
from jaxgen.data.splits import Shard
from jaxgen.models.layers import matmul
from jaxgen.sharding import make_mesh
from jaxgen.train.build import build_training

from conftest import tiny_config

STEPS = 30


def dot_input_dtypes(jaxpr) -> list[tuple[str, ...]]:
    return [tuple(str(v.aval.dtype) for v in eqn.invars) + (str(eqn.params["preferred_element_type"]),)
            for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]


def test_forward_and_both_backward_matmuls_take_bf16_inputs_and_accumulate_in_f32():
    x, w = jnp.ones((8, 4)), jnp.ones((4, 3))
    grad = jax.grad(lambda x, w: matmul(x, w, jnp.bfloat16).sum(), argnums=(0, 1))
    jaxpr = jax.make_jaxpr(grad)(x, w).jaxpr
    assert dot_input_dtypes(jaxpr) == [("bfloat16", "bfloat16", "float32")] * 3
    dx, dw = grad(x, w)
    assert dx.dtype == dw.dtype == jnp.float32  # gradients come back in the inputs' dtype
    np.testing.assert_array_equal(dx, np.full((8, 4), 3.0))
    np.testing.assert_array_equal(dw, np.full((4, 3), 8.0))


def test_f32_compute_keeps_full_precision():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 32))
    w = jax.random.normal(jax.random.PRNGKey(1), (32, 8))
    np.testing.assert_allclose(matmul(x, w, jnp.float32), np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-5)


def train_losses(compute_dtype: str, tokenizer, devices) -> list[float]:
    cfg = tiny_config(f"model.compute_dtype={compute_dtype}", "mesh.data=1", "optimizer.lr=3e-3")
    training = build_training(cfg, make_mesh(cfg.mesh, devices[:1]))
    state, losses = training.init_state(), []
    stream = train_batches(cfg.data, tokenizer, Shard())
    for batch in itertools.islice(stream, STEPS):
        state, metrics = training.train_step(state, to_global(batch, training.mesh))
        losses.append(float(metrics["loss"]))
    stream.close()
    return losses


def test_bf16_training_tracks_f32_on_real_text(tokenizer, devices):
    """Same init, same batches of the bundled corpus, 30 steps: the loss curves agree.

    Tolerance: every step within 0.01 nats and the last five steps' mean within 0.5%
    (the loss falls from 6.25 to 4.55). Measured: largest gap 0.0005 nats. At the tiny
    config's own lr of 0.01 both runs spike at step 10 by different amounts (0.17 nats
    apart), which says more about the spike than about precision, so the test uses 3e-3.
    """
    f32, bf16 = np.array(train_losses("float32", tokenizer, devices)), np.array(train_losses("bfloat16", tokenizer, devices))
    assert f32[-5:].mean() < f32[0] - 1.0, "the run must learn for the comparison to mean anything"
    np.testing.assert_allclose(bf16, f32, atol=0.01)
    np.testing.assert_allclose(bf16[-5:].mean(), f32[-5:].mean(), rtol=0.005)

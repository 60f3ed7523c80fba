"""The DiT: starts as exactly zero, keeps its shapes, names its sizes, shards like the LM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgen.config import DiTConfig, load_config
from jaxgen.data.pipeline import to_global
from jaxgen.models import build_model
from jaxgen.models.dit import patchify, unpatchify
from jaxgen.sharding import make_mesh
from jaxgen.train.build import build_training

from helpers import DIT_CONFIG, tiny_dit_config


def digit_batch(cfg, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    m = cfg.model
    return {
        "images": rng.uniform(-1, 1, (n, m.image_size, m.image_size, m.channels)).astype(np.float32),
        "labels": rng.integers(0, m.num_classes, n).astype(np.int32),
    }


def test_output_is_exactly_zero_at_init_and_blocks_start_as_identity():
    cfg = tiny_dit_config("model.learn_sigma=true", "diffusion.objective=eps", "diffusion.sampler=ddim").model
    model = build_model(cfg, nnx.Rngs(0))
    batch = digit_batch(load_config(DIT_CONFIG), 4)
    t = jnp.array([0.0, 10.0, 500.0, 999.0])
    out = nnx.jit(lambda m, x, t, y: m(x, t, y))(model, jnp.asarray(batch["images"]), t, jnp.asarray(batch["labels"]))
    assert out.shape == (4, 8, 8, 2)
    assert np.all(np.asarray(out) == 0.0)
    # adaLN-Zero: every gate is zero, so each block passes its input through unchanged.
    x_BND = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 32))
    graphdef, stacked = nnx.split(model.layers)
    block0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))
    np.testing.assert_array_equal(nnx.jit(lambda b, x, c: b(x, c))(block0, x_BND, jnp.ones((4, 32))), x_BND)


def test_patchify_round_trips_and_keeps_patches_contiguous():
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    patches = patchify(x, 4)
    assert patches.shape == (2, 4, 48)
    np.testing.assert_array_equal(patches[0, 1].reshape(4, 4, 3), x[0, :4, 4:8])  # second patch: top right
    np.testing.assert_array_equal(unpatchify(patches, 4, 8, 8), x)


@pytest.mark.parametrize("size,params_m", [("DiT-S/2", 33.0), ("DiT-B/2", 130.3), ("DiT-XL/2", 675.1)])
def test_named_sizes_have_the_paper_parameter_counts(size, params_m):
    # Peebles & Xie 2023, table 1: ImageNet-256 latents (32x32x4), 1000 classes, learned variance.
    cfg = DiTConfig(size=size, image_size=32, channels=4, num_classes=1000, learn_sigma=True)
    abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
    assert abs(counted / 1e6 - params_m) / params_m < 0.01, counted


def test_scan_and_remat_do_not_change_the_function():
    batch = digit_batch(tiny_dit_config(), 4)

    def loss_and_grad(*overrides):
        cfg = tiny_dit_config(*overrides).model
        graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)))
        # Perturb the zero-initialised weights so gradients reach every layer.
        params = jax.tree.map(lambda p: p + 0.02, params)
        t, y = jnp.array([1.0, 200.0, 500.0, 900.0]), jnp.asarray(batch["labels"])
        f = lambda p: jnp.mean(nnx.merge(graphdef, p)(jnp.asarray(batch["images"]), t, y) ** 2)
        return jax.jit(jax.value_and_grad(f))(params)

    (l0, g0), (l1, g1) = loss_and_grad(), loss_and_grad("model.scan_layers=false", "model.remat=full")
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_attention_in_batch_slices_computes_each_image_as_alone():
    """On CPU an even batch's attention runs as two interleaved batch slices: each image's output and
    gradient must be what that image gives in a batch of its own (odd: one slice)."""
    batch, cfg = digit_batch(tiny_dit_config(), 4), tiny_dit_config().model
    graphdef, params = nnx.split(build_model(cfg, nnx.Rngs(0)))
    params = jax.tree.map(lambda p: p + 0.02, params)  # past the zero-initialised output layer
    images, labels = jnp.asarray(batch["images"]), jnp.asarray(batch["labels"])
    t = jnp.array([1.0, 200.0, 500.0, 900.0])
    weights = jnp.array([1.0, -2.0, 3.0, 0.5])  # a swapped pair of images would change the loss

    def output_and_grad(rows):
        def loss(p):
            out = nnx.merge(graphdef, p)(images[rows], t[rows], labels[rows])
            return jnp.sum(weights[rows, None, None, None] * out**2), out
        (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return out, grad

    together, grad = output_and_grad(np.arange(4))
    alone = [output_and_grad(np.array([i])) for i in range(4)]
    np.testing.assert_allclose(together, jnp.concatenate([out for out, _ in alone]), rtol=1e-5, atol=1e-6)
    summed = jax.tree.map(lambda *g: sum(g), *[g for _, g in alone])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad, summed)


# ----------------------------------------------------------------------------- sharded step

STEPS = 3
ADAM_EPS = "optimizer.eps=1e-3"  # see test_sharding.py: bounds Adam's amplification of float reordering


def train_steps(cfg, devices):
    training = build_training(cfg, make_mesh(cfg.mesh, devices))
    state = training.init_state()
    losses = []
    for i in range(STEPS):
        state, metrics = training.train_step(state, to_global(digit_batch(cfg, cfg.data.batch_size, i), training.mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.fixture(scope="module")
def single_device_dit():
    return train_steps(tiny_dit_config("mesh.data=1", ADAM_EPS), jax.devices()[:1])


def test_sharded_dit_step_equals_single_device(single_device_dit, devices):
    # fsdp_tp on a 2x2x2 mesh splits the batch, the embed axis and the heads/MLP at once.
    cfg = tiny_dit_config("sharding.preset=fsdp_tp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", ADAM_EPS)
    losses, params = train_steps(cfg, devices)
    ref_losses, ref_params = single_device_dit
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params)

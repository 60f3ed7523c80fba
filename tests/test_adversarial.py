"""Adversarial training: the losses, a two-model step against a hand-computed one, and sharded discriminators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgen.config import load_config
from jaxgen.data.pipeline import to_global
from jaxgen.sharding import make_mesh
from jaxgen.tasks.adversarial import adaptive_weight, discriminator_loss, generator_loss, r1_penalty
from jaxgen.tasks.autoencoder import kl_divergence, reconstruction_error
from jaxgen.train.build import build_training

from helpers import REPO

ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


def test_losses_have_their_closed_forms():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.5, 1.0])
    np.testing.assert_allclose(discriminator_loss("hinge", real, fake), [0.0, 0.5 + 1.5, 2.0 + 2.0])
    np.testing.assert_allclose(generator_loss("hinge", fake), -fake)
    softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731
    np.testing.assert_allclose(discriminator_loss("non_saturating", real, fake), softplus(-real) + softplus(fake),
                               rtol=1e-6)
    np.testing.assert_allclose(generator_loss("non_saturating", fake), softplus(-fake), rtol=1e-6)
    patches = jnp.arange(8.0).reshape(2, 2, 2)  # a PatchGAN's scores average over the patches
    np.testing.assert_allclose(generator_loss("hinge", patches), [-1.5, -5.5])


def test_r1_penalty_is_the_squared_gradient_norm_of_each_images_score():
    a = jnp.arange(12.0).reshape(1, 2, 2, 3) / 10
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 3))
    score = lambda images: jnp.sum(images * a, axis=(1, 2, 3)) + jnp.sum(images ** 2, axis=(1, 2, 3))  # noqa: E731
    expected = np.sum(np.square(np.asarray(a) + 2 * np.asarray(x)), axis=(1, 2, 3))
    np.testing.assert_allclose(r1_penalty(score, x), expected, rtol=1e-5)


def test_adaptive_weight_is_the_clipped_gradient_norm_ratio():
    rec, adv = jnp.array([3.0, 4.0]), jnp.array([0.0, 0.5])
    np.testing.assert_allclose(adaptive_weight(rec, adv, 1e4), 5.0 / (0.5 + 1e-4), rtol=1e-6)
    assert float(adaptive_weight(rec, jnp.zeros(2), 7.0)) == 7.0


# ----------------------------------------------------------------------------- a step by hand

LR, LR_D, B1, B2, EPS = 1e-3, 3e-3, 0.9, 0.99, 1e-8
KL_WEIGHT, ADV_WEIGHT, START = 0.01, 0.5, 1


def autoencoder_config(*extra):
    return load_config(None, [
        "model.kind=autoencoder", "images.source=idx", "images.idx=unused", "model.image_size=16",
        "model.block_channels=[8,8]", "model.norm_groups=4", "model.latent_channels=2", "data.batch_size=4",
        f"optimizer.lr={LR}", "optimizer.warmup_steps=0", "optimizer.decay=constant", "optimizer.weight_decay=0",
        f"optimizer.b1={B1}", f"optimizer.b2={B2}", "optimizer.clip_norm=null", f"autoencoder.kl_weight={KL_WEIGHT}",
        f"autoencoder.adversarial.weight={ADV_WEIGHT}", f"autoencoder.adversarial.start_step={START}",
        "autoencoder.adversarial.channels=8", "autoencoder.adversarial.layers=1",
        f"autoencoder.adversarial.optimizer.lr={LR_D}", f"autoencoder.adversarial.optimizer.b1={B1}",
        f"autoencoder.adversarial.optimizer.b2={B2}", *extra])


def adam(params, grads, moments, count, lr):
    """Adam by hand (no weight decay): returns new params and moments; `count` updates came before this one."""
    m, v = moments
    m = jax.tree.map(lambda m, g: B1 * m + (1 - B1) * g, m, grads)
    v = jax.tree.map(lambda v, g: B2 * v + (1 - B2) * g * g, v, grads)
    t = count + 1
    new = jax.tree.map(lambda p, m, v: p - lr * (m / (1 - B1 ** t)) / (jnp.sqrt(v / (1 - B2 ** t)) + EPS),
                       params, m, v)
    return new, (m, v)


def reference_steps(training, params, rng, batch, steps):
    """The autoencoder and discriminator updates of `steps` train steps, written out from the losses' definitions."""
    graphdefs = training.layout.models.graphdefs
    merge = lambda group, p: nnx.merge(graphdefs[group], p)  # noqa: E731
    ae, disc = params["model"], params["discriminator"]
    zeros = lambda tree: (jax.tree.map(jnp.zeros_like, tree),) * 2  # noqa: E731
    ae_moments, disc_moments, disc_count = zeros(ae), zeros(disc), 0
    x = batch["images"]
    for step in range(steps):
        step_rng = jax.random.fold_in(rng, step)

        def reconstruct(ae_params, key):
            mean, logvar = merge("model", ae_params).encode(x)
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
            return merge("model", ae_params).decode(z), mean, logvar

        def rec_mean(ae_params):
            return jnp.mean(reconstruction_error("l1", x, reconstruct(ae_params, step_rng)[0]))

        def adv_mean(ae_params):
            return jnp.mean(-merge("discriminator", disc)(reconstruct(ae_params, step_rng)[0]))

        def autoencoder_loss(ae_params):
            x_hat, mean, logvar = reconstruct(ae_params, step_rng)
            loss = jnp.mean(reconstruction_error("l1", x, x_hat) + KL_WEIGHT * kl_divergence(mean, logvar))
            if step >= START:  # the whole-model gradients at the decoder's last kernel set the weight
                last = lambda grads: grads["decoder"]["conv_out"]["kernel"]  # noqa: E731
                g_rec, g_adv = last(jax.grad(rec_mean)(ae_params)), last(jax.grad(adv_mean)(ae_params))
                weight = jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_adv) + 1e-4)
                loss += ADV_WEIGHT * jax.lax.stop_gradient(weight) * jnp.mean(
                    -merge("discriminator", disc)(x_hat))
            return loss

        # Compiled, not run op by op: the same arithmetic, minutes faster.
        ae, ae_moments = adam(ae, jax.jit(jax.grad(autoencoder_loss))(ae), ae_moments, step, LR)
        if step >= START:
            d_rng = jax.random.fold_in(step_rng, 0x5EED0000 + 1)
            fake = jax.lax.stop_gradient(jax.jit(reconstruct)(ae, d_rng)[0])

            def critic_loss(d_params):
                d = merge("discriminator", d_params)
                return jnp.mean(jnp.mean(jax.nn.relu(1 - d(x)), axis=(1, 2)) + jnp.mean(jax.nn.relu(1 + d(fake)),
                                                                                         axis=(1, 2)))

            disc, disc_moments = adam(disc, jax.jit(jax.grad(critic_loss))(disc), disc_moments, disc_count, LR_D)
            disc_count += 1
    return {"model": ae, "discriminator": disc}


def test_an_adversarial_autoencoder_step_equals_the_hand_computed_one(devices):
    cfg = autoencoder_config(*ONE_DEVICE)
    training = build_training(cfg, make_mesh(cfg.mesh, devices[:1]))
    batch = {"images": np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32),
             "labels": np.zeros(4, np.int32)}
    state = training.init_state()
    params0, rng = jax.device_get((state.params, state.rng))  # the step donates the state
    metrics = []
    for _ in range(START + 1):  # one step before the discriminator starts, one with it
        state, m = training.train_step(state, to_global(batch, training.mesh))
        metrics.append(jax.device_get(m))
    assert metrics[0]["discriminator_loss"] == 0 and metrics[1]["discriminator_loss"] > 0
    expected = jax.tree_util.tree_leaves_with_path(reference_steps(training, params0, rng, batch, START + 1))
    for (path, want), got in zip(expected, jax.tree.leaves(jax.device_get(state.params))):
        # Attention's key bias shifts every score of a query alike, so its gradient is zero up to
        # rounding, which Adam scales to steps of any size up to the learning rate.
        atol = 2 * LR if "to_k']['bias" in jax.tree_util.keystr(path) else 2e-6
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=atol, err_msg=jax.tree_util.keystr(path))
    # The discriminator's optimizer (Adam's moments and its schedule) counted one update, not two: its
    # state held while it waited.
    opt_state = jax.device_get(state.opt_state)
    for group, updates in (("model", 2), ("discriminator", 1)):
        counts = [int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state[group])
                  if "count" in jax.tree_util.keystr(path)]
        assert counts and set(counts) == {updates}, (group, counts)


# ----------------------------------------------------------------------------- sharding

def gan_config(*extra):
    return load_config(None, ["model.kind=gan", "images.source=idx", "images.idx=unused", "model.image_size=8",
                              "model.generator_channels=[16,8]", "model.discriminator_channels=[8,16]",
                              "model.noise_dim=8", "data.batch_size=8", "gan.ema_warmup=0", "gan.ema_decay=0.5", *extra])


@pytest.mark.parametrize("preset,mesh", [("fsdp", ["mesh.data=1", "mesh.fsdp=8"]),
                                         ("tp", ["mesh.data=4", "mesh.tensor=2"]),
                                         ("fsdp_tp", ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"])])
def test_discriminators_are_sharded_like_any_model(devices, preset, mesh):
    for cfg in (autoencoder_config(f"sharding.preset={preset}", *mesh, "model.block_channels=[16,16]",
                                   "autoencoder.adversarial.channels=16"),
                gan_config(f"sharding.preset={preset}", *mesh)):
        shardings = build_training(cfg, make_mesh(cfg.mesh, devices)).layout.models.shardings
        split = [s.spec for s in jax.tree.leaves(shardings["discriminator"]) if any(s.spec)]
        axis = "fsdp" if preset == "fsdp" else "tensor"
        assert any(axis in jax.tree.leaves(tuple(spec)) for spec in split), (cfg.model.kind, preset)


def gan_step(devices, *mesh, steps=1):
    """(params, averages, metrics) after `steps` GAN steps on a fixed batch."""
    batch = {"images": np.random.default_rng(1).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
             "labels": np.arange(8, dtype=np.int32) % 10}
    # A large epsilon keeps Adam from scaling gradients that are zero up to rounding into full steps.
    cfg = gan_config(*mesh, "optimizer.eps=0.01", "gan.discriminator_optimizer.eps=0.01")
    training = build_training(cfg, make_mesh(cfg.mesh, devices))
    state = training.init_state()
    for _ in range(steps):
        state, metrics = training.train_step(state, to_global(batch, training.mesh))
    return jax.device_get((state.params, state.ema_params, metrics))


def test_a_sharded_gan_step_equals_one_device(devices):
    one = gan_step(devices[:1], *ONE_DEVICE, steps=2)
    sharded = gan_step(devices, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "sharding.preset=fsdp_tp", steps=2)
    assert set(one[1]) == {"generator"}  # only the generator keeps an average
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), one, sharded)


def test_the_generators_gradient_holds_with_labels_split_over_two_mesh_axes(devices):
    """Class embeddings gathered by index gave the generator a wrong gradient here (right loss); not any more."""
    one = gan_step(devices[:1], *ONE_DEVICE)[2]
    sharded = gan_step(devices, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "sharding.preset=fsdp_tp")[2]
    np.testing.assert_allclose([sharded["loss"], sharded["grad_norm"]], [one["loss"], one["grad_norm"]], rtol=1e-5)


def test_a_gan_steps_flops_per_image_are_those_xla_counts():
    """The FLOPs MFU is taken from: both phases (generator, then discriminator on real and fake images), as XLA
    counts the compiled step; norms, activations and the optimizers are the few percent it has besides."""
    cfg = load_config(REPO / "configs" / "gan_fashion.yaml", [*ONE_DEVICE, "data.batch_size=8"])
    training = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    m = cfg.model
    batch = {"images": jax.ShapeDtypeStruct((8, m.image_size, m.image_size, m.channels), jnp.float32),
             "labels": jax.ShapeDtypeStruct((8,), jnp.int32)}
    state = jax.eval_shape(training.init_state)
    counted = training.train_step.lower(state, batch).compile().cost_analysis()["flops"]
    assert counted == pytest.approx(8 * training.task.flops_per_unit(), rel=0.1)

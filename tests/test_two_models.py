"""A task of several models: one frozen, two trained alternately within each step, one averaged.

The shape of a GAN (a critic, then a generator updated against the new critic)
or of latent diffusion (a frozen encoder): the state, step, shardings and
checkpoints that serve one model must serve them all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgen.checkpoint import Checkpointer
from jaxgen.data.pipeline import to_global
from jaxgen.sharding import make_mesh
from jaxgen.tasks import ModelSpec, Phase
from jaxgen.train.build import build_training

from conftest import tiny_config

D = 16  # divisible by every mesh axis size used here


class Dense(nnx.Module):
    def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs, axes=("embed", "mlp")):
        self.w = nnx.Param(nnx.initializers.normal(0.3)(rngs.params(), (d_in, d_out)), out_sharding=axes)

    def __call__(self, x):
        return jnp.tanh(x @ self.w[...])


class CriticThenGenerator:
    """encoder (frozen) -> critic scores it; generator is trained to make the critic's score match too."""

    unit = "examples"
    loss_name = "squared error"
    sample_every = 0
    sample_options: dict = {}

    def __init__(self, phases=("critic", "generator")):
        self.phase_names = phases

    def models(self):
        return {"encoder": ModelSpec(build=lambda rngs: Dense(D, D, rngs), trained=False),
                "critic": ModelSpec(build=lambda rngs: Dense(D, 1, rngs, axes=("embed", None))),
                "generator": ModelSpec(build=lambda rngs: Dense(D, D, rngs), ema=(0.5, 0))}

    def phases(self):
        every = {"critic": Phase("critic", ("critic",), self.critic_loss),
                 "generator": Phase("generator", ("generator",), self.generator_loss)}
        return [every[name] for name in self.phase_names]

    def critic_loss(self, models, batch, rng, step=None):
        score = models["critic"](models["encoder"](batch["x"]))[:, 0]
        return jnp.sum((score - batch["y"]) ** 2), jnp.float32(batch["y"].shape[0])

    def generator_loss(self, models, batch, rng, step=None):
        score = models["critic"](models["generator"](batch["x"]))[:, 0]
        return jnp.sum((score - batch["y"]) ** 2 * batch["scale"]), jnp.float32(batch["y"].shape[0])

    def eval_loss(self, models, batch):
        return self.critic_loss(models, batch, None)

    def units_per_batch(self):
        return 16

    def flops_per_unit(self):
        return 1.0


def batches(n: int, poison: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    out = [{"x": rng.standard_normal((16, D)).astype(np.float32), "y": rng.uniform(-0.5, 0.5, 16).astype(np.float32),
            "scale": np.ones(16, np.float32)} for _ in range(n)]
    if poison:
        out[-1]["scale"][3] = np.nan  # only the generator's loss sees it
    return out


def training_on(devices, *overrides, task=None):
    cfg = tiny_config("optimizer.warmup_steps=0", *overrides)
    return build_training(cfg, make_mesh(cfg.mesh, devices), task or CriticThenGenerator())


def run_steps(training, data):
    state = training.init_state()
    metrics = []
    for batch in data:
        state, m = training.train_step(state, to_global(batch, training.mesh))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def test_groups_get_what_they_declare(devices):
    training = training_on(devices, "mesh.data=2", "mesh.fsdp=4")
    state = training.init_state()
    assert set(state.params) == {"encoder", "critic", "generator"}
    assert set(state.opt_state) == {"critic", "generator"}  # the frozen encoder has no optimizer state
    assert set(state.ema_params) == {"generator"}
    assert state.params["critic"]["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert state.params["generator"]["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert training.layout.bytes_per_device()["gradients"] < training.layout.bytes_per_device()["parameters"]


def test_phases_run_in_order_each_updating_only_its_groups(devices):
    data = batches(1)
    both, metrics = run_steps(training_on(devices[:1], "mesh.data=1"), data)
    assert {"loss", "grad_norm", "generator_loss", "generator_grad_norm"} <= set(metrics[0])
    fresh = jax.device_get(training_on(devices[:1], "mesh.data=1").init_state())
    jax.tree.map(np.testing.assert_array_equal, both.params["encoder"], fresh.params["encoder"])  # frozen

    # The same as the critic's update alone, then the generator's against the updated critic.
    critic_first, _ = run_steps(training_on(devices[:1], "mesh.data=1", task=CriticThenGenerator(("critic",))), data)
    generator_only = training_on(devices[:1], "mesh.data=1", task=CriticThenGenerator(("generator",)))
    start = generator_only.init_state()
    start = start.replace(params={**start.params, "critic": jax.device_put(critic_first.params["critic"])})
    then, _ = generator_only.train_step(start, to_global(data[0], generator_only.mesh))
    np.testing.assert_array_equal(both.params["critic"]["w"], critic_first.params["critic"]["w"])
    np.testing.assert_allclose(both.params["generator"]["w"], jax.device_get(then.params["generator"]["w"]),
                               rtol=1e-6, atol=1e-7)
    ema = 0.5 * fresh.params["generator"]["w"] + 0.5 * both.params["generator"]["w"]
    np.testing.assert_allclose(both.ema_params["generator"]["w"], ema, rtol=1e-6)


def test_sharded_equals_single_device_and_a_restore_continues_bit_identically(devices, tmp_path):
    data = batches(3)
    single, single_metrics = run_steps(training_on(devices[:1], "mesh.data=1"), data)
    sharded_training = training_on(devices, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                   "sharding.preset=fsdp_tp")
    sharded, sharded_metrics = run_steps(sharded_training, data)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), single.params, sharded.params)

    state = sharded_training.init_state()
    state, _ = sharded_training.train_step(state, to_global(data[0], sharded_training.mesh))
    saver = Checkpointer(tmp_path / "ck", sharded_training.cfg.checkpoint)
    saver.save(1, state, {}, {})
    saver.wait()
    expected, _ = sharded_training.train_step(state, to_global(data[1], sharded_training.mesh))
    restored = Checkpointer(tmp_path / "ck", sharded_training.cfg.checkpoint).restore(
        sharded_training.layout.target, 1).state
    continued, _ = sharded_training.train_step(restored, to_global(data[1], sharded_training.mesh))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(continued), jax.device_get(expected))


@pytest.mark.parametrize("microbatches", [1, 2])
def test_a_non_finite_phase_skips_the_whole_step(devices, microbatches):
    training = training_on(devices[:1], "mesh.data=1", f"train.microbatches={microbatches}")
    before = jax.device_get(training.init_state())
    after, metrics = run_steps(training, batches(1, poison=True))
    assert int(after.nonfinite_steps) == 1 and int(metrics[0]["nonfinite_cause"]) == 1  # the generator's loss
    jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state, after.ema_params),
                 (before.params, before.opt_state, before.ema_params))

"""Sharded training equals one device, under every preset; placement follows the rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxgen.data.pipeline import to_global
from jaxgen.errors import ConfigError
from jaxgen.sharding import make_mesh
from jaxgen.train.build import build_training
from jaxgen.train.optimizer import warn_of_long_warmup

from conftest import tiny_config
from helpers import random_batches

STEPS = 3
# Adam divides by sqrt(v) + eps, so a gradient element near zero turns float
# reordering noise (~1e-9) into an update difference of up to lr. A larger eps
# bounds that amplification and lets the comparison stay tight.
ADAM_EPS = "optimizer.eps=1e-3"


def train_steps(cfg, devices):
    training = build_training(cfg, make_mesh(cfg.mesh, devices))
    state = training.init_state()
    losses = []
    for batch in random_batches(cfg, STEPS):
        state, metrics = training.train_step(state, to_global(batch, training.mesh))
        losses.append(float(metrics["loss"]))
    return losses, state, training


@pytest.fixture(scope="module")
def single_device():
    losses, state, _ = train_steps(tiny_config("mesh.data=1", ADAM_EPS), jax.devices()[:1])
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize(
    "preset,mesh",
    [("dp", (2, 2, 2)), ("fsdp", (2, 2, 2)), ("tp", (2, 2, 2)), ("fsdp_tp", (2, 2, 2)), ("fsdp_tp", (1, 4, 2))],
)
def test_sharded_step_equals_single_device(single_device, devices, preset, mesh):
    d, f, t = mesh
    cfg = tiny_config(f"sharding.preset={preset}", f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}", ADAM_EPS)
    losses, state, _ = train_steps(cfg, devices)
    ref_losses, ref_params = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), jax.device_get(state.params), ref_params
    )


EXPECTED_SPECS = {
    # preset: (layers/attn/wq, layers/mlp/w_down, embed, final_norm)
    "dp": (P(None, None, None), P(None, None, None), P(None, None), P(None)),
    "fsdp": (P(None, "fsdp", None), P(None, None, "fsdp"), P(None, "fsdp"), P(None)),
    "tp": (P(None, None, "tensor"), P(None, "tensor", None), P("tensor", None), P(None)),
    "fsdp_tp": (P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp"), P("tensor", "fsdp"), P(None)),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_SPECS))
def test_parameter_and_optimizer_shardings_follow_the_rules(devices, preset):
    cfg = tiny_config(f"sharding.preset={preset}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    training = build_training(cfg, make_mesh(cfg.mesh, devices))
    state = training.init_state()
    p = state.params["model"]
    actual = (p["layers"]["attn"]["wq"]["kernel"], p["layers"]["mlp"]["w_down"]["kernel"], p["embed"],
              p["final_norm"]["scale"])
    for array, spec in zip(actual, EXPECTED_SPECS[preset]):
        assert array.sharding.spec == spec
    # Adam's moments live where their parameters live.
    mu = state.opt_state["model"][1][0].mu
    assert mu["layers"]["attn"]["wq"]["kernel"].sharding.spec == EXPECTED_SPECS[preset][0]


def test_custom_rules_override_the_preset(devices):
    cfg = tiny_config("sharding.preset=fsdp", "mesh.data=2", "mesh.fsdp=4", "sharding.rules.mlp=fsdp",
                      "sharding.rules.embed=null")
    training = build_training(cfg, make_mesh(cfg.mesh, devices))
    spec = training.layout.shardings.params["model"]["layers"]["mlp"]["w_up"]["kernel"].spec
    assert spec == P(None, None, "fsdp")


def test_a_rule_for_an_axis_the_model_does_not_have_is_refused(devices):
    """`sharding.rules.mlpp=fsdp` trained with no word, recorded a rule that shards nothing."""
    cfg = tiny_config("sharding.preset=fsdp", "mesh.data=2", "mesh.fsdp=4", "sharding.rules.mlpp=fsdp")
    with pytest.raises(ConfigError, match=r"^sharding.rules.mlpp: this model has no logical axis 'mlpp'; its axes: "
                                          r"act_batch, .*, mlp, .*vocab$"):
        build_training(cfg, make_mesh(cfg.mesh, devices))


def test_a_mesh_axis_that_splits_nothing_and_a_warmup_past_the_end_are_named(devices, caplog):
    """`mesh.tensor=2` with the fsdp preset made 2 devices compute the same, and a warmup longer than the run
    was cut to it, both without a word."""
    idle = tiny_config("sharding.preset=fsdp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=3",
                       "optimizer.warmup_steps=10")
    with caplog.at_level("WARNING", logger="jaxgen"):
        build_training(idle, make_mesh(idle.mesh, devices))
        warn_of_long_warmup(idle.optimizer, idle.train.steps)
    assert [record.getMessage() for record in caplog.records] == [
        "mesh.tensor=2: sharding.preset=fsdp splits no parameter of this model over the tensor axis, so its 2 devices "
        "all compute the same; give them to mesh.data, or use sharding.preset=tp or fsdp_tp (or sharding.rules)",
        "optimizer.warmup_steps=10 is more than train.steps=3: the learning rate warms up over all 3 steps and never "
        "decays"]
    caplog.clear()
    split = tiny_config("sharding.preset=fsdp_tp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=3",
                        "optimizer.warmup_steps=3")
    with caplog.at_level("WARNING", logger="jaxgen"):
        build_training(split, make_mesh(split.mesh, devices))
        warn_of_long_warmup(split.optimizer, split.train.steps)
    assert caplog.records == []


def test_indivisible_parameter_names_path_and_axes(devices):
    cfg = tiny_config("sharding.preset=tp", "mesh.data=1", "mesh.tensor=8", "model.d_ff=100")
    with pytest.raises(ValueError, match=r"parameter layers/mlp/w_down/kernel of shape \(2, 100, 64\).*\('tensor',\).*not divisible by 8"):
        build_training(cfg, make_mesh(cfg.mesh, devices))


def test_indivisible_heads_name_the_activation_axis(devices):
    cfg = tiny_config("sharding.preset=tp", "mesh.data=1", "mesh.tensor=8")
    training = build_training(cfg, make_mesh(cfg.mesh, devices))
    batch = to_global(random_batches(cfg, 1)[0], training.mesh)
    with pytest.raises(ValueError, match=r"activation .*act_heads.*\(\d+, 64, 4, 16\).*\('tensor',\).*4 is not divisible by 8"):
        training.train_step.lower(training.init_state(), batch)


def test_a_rule_naming_a_mesh_axis_twice_is_one_line():
    """`sharding.rules.mlp=[fsdp,fsdp]` failed as `unexpected DuplicateSpecError`, exit 1, naming no setting."""
    from jaxgen.sharding import resolve_rules

    with pytest.raises(ConfigError, match=r"^sharding.rules.mlp: \['fsdp', 'fsdp'\] names a mesh axis twice"):
        resolve_rules("fsdp", {"mlp": ["fsdp", "fsdp"]})
    assert resolve_rules("fsdp", {"mlp": ["data", "fsdp"]})["mlp"] == ("data", "fsdp")

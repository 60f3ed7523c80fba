"""Train state: a plain pytree that jit, optax and checkpointing all understand.

Parameters are pure nested dicts of arrays (no NNX wrappers), one per model
group of the task, so checkpoints and exports have readable keys like
`params/model/layers/attn/wq/kernel`. Trained groups have optimizer state;
groups the task averages have an EMA. The models' graph definitions travel
separately and are merged with the params inside the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jaxgen.device_memory import bytes_per_device
from jaxgen.sharding import Rules, replicated
from jaxgen.tasks import Task
from jaxgen.tasks.layout import ModelLayout, fresh_params, plan_models


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps applied so far
    params: dict  # group -> parameters
    opt_state: dict  # trained group -> its optimizer's state
    rng: jax.Array  # the run's base key; step keys are folded from it
    nonfinite_steps: jax.Array  # int32 scalar: steps skipped for a non-finite loss, gradient or update
    ema_params: dict  # group the task averages -> the average of its parameters, for samples and evaluation


def sampling_params(state: TrainState) -> dict:
    """What evaluation and samples use: each group's parameter average where the task keeps one."""
    return {group: state.ema_params.get(group, params) for group, params in state.params.items()}


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Everything known about the state before any array exists."""

    models: ModelLayout
    abstract: TrainState  # ShapeDtypeStructs
    shardings: TrainState  # NamedShardings, same structure

    def bytes_per_device(self) -> dict[str, int]:
        """What training holds on the fullest device at least: the state, and a gradient per trained parameter."""
        target = self.target
        return {"parameters": bytes_per_device(target.params),
                "optimizer state": bytes_per_device(target.opt_state),
                "EMA": bytes_per_device(target.ema_params),
                "gradients": bytes_per_device({g: target.params[g] for g in target.opt_state})}

    @property
    def target(self) -> TrainState:
        """ShapeDtypeStructs carrying the shardings: checkpoints restore straight into them."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract, self.shardings)


def plan_state(task: Task, txs: dict[str, optax.GradientTransformation], mesh: Mesh, rules: Rules,
               seed: int) -> StateLayout:
    """Shapes and shardings of the whole train state, via eval_shape (no memory used)."""
    models = plan_models(task, mesh, rules, seed)
    abstract = jax.eval_shape(lambda: fresh_state(task, txs, seed))
    rep = replicated(mesh)
    # Optimizer moments are sharded like the parameters they track; counts are replicated.
    opt_shardings = {
        group: optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state[group], models.shardings[group],
                                     transform_non_params=lambda _: rep)
        for group, tx in txs.items()
    }
    shardings = TrainState(step=rep, params=models.shardings, opt_state=opt_shardings, rng=rep, nonfinite_steps=rep,
                           ema_params={group: models.shardings[group] for group in abstract.ema_params})
    return StateLayout(models=models, abstract=abstract, shardings=shardings)


def fresh_state(task: Task, txs: dict[str, optax.GradientTransformation], seed: int) -> TrainState:
    params = fresh_params(task, seed)
    zero = jnp.zeros((), jnp.int32)
    averaged = [group for group, spec in task.models().items() if spec.ema]
    return TrainState(step=zero, params=params, opt_state={group: tx.init(params[group]) for group, tx in txs.items()},
                      rng=jax.random.PRNGKey(seed), nonfinite_steps=zero,
                      ema_params={group: jax.tree.map(jnp.copy, params[group]) for group in averaged})


def init_state(task: Task, txs: dict[str, optax.GradientTransformation], layout: StateLayout,
               seed: int) -> TrainState:
    """Create the state directly in its shardings: each device builds only its shards."""
    init = jax.jit(lambda: fresh_state(task, txs, seed), out_shardings=layout.shardings)
    platform = next(iter(jax.tree.leaves(layout.shardings)[0].device_set)).platform
    values = sum(x.size for x in jax.tree.leaves(layout.abstract))
    return init.lower().compile(compiler_options=init_compiler_options(platform, values))()


# Above this many values, an unoptimized init program would run longer than its faster compile saves.
QUICK_INIT_MAX_VALUES = 16_000_000


def init_compiler_options(platform: str, values: int) -> dict[str, Any]:
    """XLA options for the program that makes a fresh state of `values` numbers.

    It runs once per run, yet its random-number generation (long straight-line code per
    parameter) takes XLA:CPU's optimizing backend seconds to compile, most of a small
    model's cold start. A small state on CPU is therefore compiled without backend
    optimizations; its numbers may then differ from the optimized program's in the last
    bit, always the same way for the same state. Other platforms compile as usual.
    """
    if platform == "cpu" and values <= QUICK_INIT_MAX_VALUES:
        return {"xla_backend_optimization_level": 0}
    return {}


def with_params(state: TrainState, params: dict[str, Any]) -> TrainState:
    """`state` starting from other parameters (fine-tuning): optimizer state as fresh, averages equal to them."""
    return state.replace(params={**state.params, **params},
                         ema_params={g: params.get(g, ema) for g, ema in state.ema_params.items()})

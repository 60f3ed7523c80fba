"""Train state: a plain pytree that jit, optax and checkpointing all understand.

Parameters are pure nested dicts of arrays (no NNX wrappers), so checkpoints and
exports have readable keys like `layers/attn/wq/kernel`. The model's graph
definition travels separately and is merged with the params inside the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from jaxgen.device_memory import bytes_per_device
from jaxgen.sharding import Rules, param_shardings, replicated
from jaxgen.train.tasks import Task


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: dict
    opt_state: Any
    rng: jax.Array  # the run's base key; step keys are folded from it
    nonfinite_steps: jax.Array  # int32 scalar: updates skipped for a non-finite loss or gradient
    # Moving average of params for sampling and evaluation, when the task asks for one (else None).
    ema_params: dict | None = None


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Everything known about the state before any array exists."""

    graphdef: nnx.GraphDef
    abstract: TrainState  # ShapeDtypeStructs
    shardings: TrainState  # NamedShardings, same structure

    def bytes_per_device(self) -> dict[str, int]:
        """What training holds on the fullest device at least: the state, and a gradient per parameter."""
        target = self.target
        params = bytes_per_device(target.params)
        return {"parameters": params, "optimizer state": bytes_per_device(target.opt_state),
                "EMA": bytes_per_device(target.ema_params), "gradients": params}

    @property
    def target(self) -> TrainState:
        """ShapeDtypeStructs carrying the shardings: checkpoints restore straight into them."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract, self.shardings)


def _model_parts(task: Task, rng: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(task.build_model(nnx.Rngs(params=rng)))


def plan_state(task: Task, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules, seed: int) -> StateLayout:
    """Shapes and shardings of the whole train state, via eval_shape (no memory used)."""
    rng = jax.random.PRNGKey(seed)
    graphdef, abstract_params = nnx.eval_shape(lambda: _model_parts(task, rng))
    p_shardings = param_shardings(abstract_params, mesh, rules)
    abstract = jax.eval_shape(lambda: _fresh_state(task, tx, rng))
    rep = replicated(mesh)
    # Optimizer moments are sharded like the parameters they track; counts are replicated.
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, p_shardings, transform_non_params=lambda _: rep
    )
    shardings = TrainState(step=rep, params=p_shardings, opt_state=opt_shardings, rng=rep, nonfinite_steps=rep,
                           ema_params=p_shardings if abstract.ema_params is not None else None)
    return StateLayout(graphdef=graphdef, abstract=abstract, shardings=shardings)


def _fresh_state(task: Task, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    _, params = _model_parts(task, rng)
    params = nnx.to_pure_dict(params)
    zero = jnp.zeros((), jnp.int32)
    ema = jax.tree.map(jnp.copy, params) if task_ema(task) else None
    return TrainState(step=zero, params=params, opt_state=tx.init(params), rng=rng, nonfinite_steps=zero, ema_params=ema)


def task_ema(task: Task) -> tuple[float, int] | None:
    """(decay, warm-up steps) of the parameter average the task samples from, or None."""
    settings = getattr(task, "ema_settings", None)
    return settings() if settings else None


def init_state(task: Task, tx: optax.GradientTransformation, layout: StateLayout, seed: int) -> TrainState:
    """Create the state directly in its shardings: each device builds only its shards."""
    init = jax.jit(lambda rng: _fresh_state(task, tx, rng), out_shardings=layout.shardings)
    return init(jax.random.PRNGKey(seed))

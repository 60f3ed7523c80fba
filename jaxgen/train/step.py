"""The pure train and eval steps, and their compilation with explicit shardings."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxgen.integrity import all_finite
from jaxgen.sharding import BATCH_AXES, Rules, activation_rules, replicated
from jaxgen.train.ema import ema_update
from jaxgen.train.state import StateLayout, TrainState, task_ema
from jaxgen.train.tasks import Task

# Why a step was skipped (metrics["nonfinite_cause"]); the first that applies.
NONFINITE_NONE, NONFINITE_LOSS, NONFINITE_GRADIENT, NONFINITE_UPDATE = 0, 1, 2, 3
# "update": the new parameters, optimizer state or EMA (e.g. an overflowing learning rate).
NONFINITE_CAUSES = {NONFINITE_LOSS: "loss", NONFINITE_GRADIENT: "gradient", NONFINITE_UPDATE: "update"}


def _split_microbatches(batch: dict, n: int) -> dict:
    """(B, ...) -> (n, B/n, ...), microbatch m = rows m, m+n, m+2n, ...

    Striding keeps every microbatch spread over all data-parallel devices
    instead of putting whole microbatches on a few of them.
    """
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    graphdef: nnx.GraphDef, microbatches: int) -> Callable:
    ema = task_ema(task)

    def summed_loss(params, batch, rng):
        return task.loss(nnx.merge(graphdef, params), batch, rng)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        if microbatches == 1:
            (loss_sum, weight), grads = grad_fn(state.params, batch, rng)
        else:
            def accumulate(carry, micro):
                i, micro_batch = micro
                (l, w), g = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, i))
                acc_l, acc_w, acc_g = carry
                return (acc_l + l, acc_w + w, jax.tree.map(jnp.add, acc_g, g)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            micro = (jnp.arange(microbatches), _split_microbatches(batch, microbatches))
            (loss_sum, weight, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros), micro)
        weight = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g, p: (g / weight).astype(p.dtype), grads, state.params)
        loss, grad_norm = loss_sum / weight, optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema is not None:
            ema_params = ema_update(state.ema_params, params, state.step + 1, *ema)
        # Nothing non-finite may reach the state: a finite loss and gradient can still
        # give a non-finite update (an overflowing learning rate). Such a step keeps
        # params, optimizer state and EMA bit for bit, and says why it was skipped.
        cause = jnp.select(
            [~jnp.isfinite(loss), ~jnp.isfinite(grad_norm), ~all_finite((params, opt_state, ema_params))],
            [NONFINITE_LOSS, NONFINITE_GRADIENT, NONFINITE_UPDATE], NONFINITE_NONE)
        finite = cause == NONFINITE_NONE
        keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_bad(params, state.params),
            opt_state=keep_if_bad(opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            ema_params=keep_if_bad(ema_params, state.ema_params) if ema is not None else None,
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "nonfinite_steps": new_state.nonfinite_steps, "nonfinite_cause": cause}
        return new_state, metrics

    return train_step


def make_eval_step(task: Task, graphdef: nnx.GraphDef) -> Callable:
    def eval_step(params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
        return task.loss(nnx.merge(graphdef, params), batch, jax.random.PRNGKey(0))

    return eval_step


def held_out_sums(eval_step: Callable, params: dict, global_batches: list[dict]) -> tuple[float, float]:
    """(summed loss, summed weight) over fixed held-out batches; the loop and `jaxgen eval` share it."""
    sums = [eval_step(params, batch) for batch in global_batches]
    loss_sum, weight_sum = (float(sum(x)) for x in zip(*jax.device_get(sums)))
    return loss_sum, weight_sum


def with_rules(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """Trace `fn` with the activation sharding rules active."""
    def wrapped(*args):
        with activation_rules(mesh, rules):
            return fn(*args)

    return wrapped


def compile_train_step(train_step: Callable, layout: StateLayout, mesh: Mesh, rules: Rules) -> Callable:
    """jit with the state's shardings in and out; the old state's buffers are donated."""
    batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))
    return jax.jit(
        with_rules(train_step, mesh, rules),
        in_shardings=(layout.shardings, batch_spec),
        out_shardings=(layout.shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def compile_eval_step(eval_step: Callable, layout: StateLayout, mesh: Mesh, rules: Rules) -> Callable:
    batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))
    return jax.jit(
        with_rules(eval_step, mesh, rules),
        in_shardings=(layout.shardings.params, batch_spec),
        out_shardings=replicated(mesh),
    )

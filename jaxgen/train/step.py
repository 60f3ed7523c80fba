"""The pure train step, and its compilation with explicit shardings.

A step runs the task's phases in order. Each phase takes the gradient of its
loss with respect to the groups it trains (the other groups' parameters held
as they are at that moment), averaged over microbatches, and updates those
groups with their own optimizers; then the parameter averages move. If any
loss, gradient or resulting value is not finite, the whole step is skipped:
the state keeps its old values bit for bit and says why.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxgen.integrity import all_finite
from jaxgen.sharding import BATCH_AXES, Rules, replicated, with_rules
from jaxgen.tasks import Phase, Task
from jaxgen.train.ema import ema_update
from jaxgen.train.state import StateLayout, TrainState

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


def phase_metric(phase_index: int, phase: Phase, name: str) -> str:
    """Metric names: `loss`, `grad_norm` for the first phase; `<phase>_loss`, ... for the others."""
    return name if phase_index == 0 else f"{phase.name}_{name}"


def make_train_step(task: Task, txs: dict[str, optax.GradientTransformation], schedule: optax.Schedule,
                    graphdefs: dict[str, nnx.GraphDef], microbatches: int) -> Callable:
    phases = task.phases()
    averages = {group: spec.ema for group, spec in task.models().items() if spec.ema}

    def phase_gradients(phase: Phase, params: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """(mean loss, gradients of the phase's trained groups) over the batch's microbatches."""

        def summed_loss(trained, batch, rng):
            models = {g: nnx.merge(graphdefs[g], trained.get(g, params[g])) for g in graphdefs}
            return phase.loss(models, batch, rng, step)

        grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
        trained = {group: params[group] for group in phase.trains}
        if microbatches == 1:
            (loss_sum, weight), grads = grad_fn(trained, batch, rng)
        else:
            def accumulate(carry, micro):
                i, micro_batch = micro
                (l, w), g = grad_fn(trained, micro_batch, jax.random.fold_in(rng, i))
                acc_l, acc_w, acc_g = carry
                return (acc_l + l, acc_w + w, jax.tree.map(jnp.add, acc_g, g)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
            micro = (jnp.arange(microbatches), _split_microbatches(batch, microbatches))
            (loss_sum, weight, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros), micro)
        weight = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g, p: (g / weight).astype(p.dtype), grads, trained)
        return loss_sum / weight, grads

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        params, opt_state = dict(state.params), dict(state.opt_state)
        metrics, finite_losses, finite_grads = {}, [], []
        for i, phase in enumerate(phases):
            phase_rng = rng if i == 0 else jax.random.fold_in(rng, 0x5EED0000 + i)
            if phase.start_step == 0:
                loss, grads = phase_gradients(phase, params, batch, phase_rng, state.step)
            else:  # not yet started: no gradient is computed, and nothing below moves
                active = state.step >= phase.start_step
                loss, grads = jax.lax.cond(
                    active, lambda: phase_gradients(phase, params, batch, phase_rng, state.step),
                    lambda: (jnp.float32(0.0), jax.tree.map(jnp.zeros_like, {g: params[g] for g in phase.trains})))
            grad_norm = optax.tree.norm(grads)
            for group in phase.trains:
                updates, new_opt_state = txs[group].update(grads[group], opt_state[group], params[group])
                new_params = optax.apply_updates(params[group], updates)
                if phase.start_step:
                    new_params, new_opt_state = jax.tree.map(lambda n, o: jnp.where(active, n, o), (
                        new_params, new_opt_state), (params[group], opt_state[group]))
                params[group], opt_state[group] = new_params, new_opt_state
            metrics[phase_metric(i, phase, "loss")] = loss
            metrics[phase_metric(i, phase, "grad_norm")] = grad_norm
            finite_losses.append(jnp.isfinite(loss))
            finite_grads.append(jnp.isfinite(grad_norm))
        ema_params = {group: ema_update(state.ema_params[group], params[group], state.step + 1, *averages[group])
                      for group in state.ema_params}
        # Nothing non-finite may reach the state: a finite loss and gradient can still
        # give a non-finite update (an overflowing learning rate). Such a step keeps
        # params, optimizer state and EMA bit for bit, and says why it was skipped.
        cause = jnp.select(
            [~jnp.all(jnp.stack(finite_losses)), ~jnp.all(jnp.stack(finite_grads)),
             ~all_finite((params, opt_state, ema_params))],
            [NONFINITE_LOSS, NONFINITE_GRADIENT, NONFINITE_UPDATE], NONFINITE_NONE)
        finite = cause == NONFINITE_NONE
        keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_bad(params, state.params),
            opt_state=keep_if_bad(opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            ema_params=keep_if_bad(ema_params, state.ema_params),
        )
        metrics.update(lr=schedule(state.step), nonfinite_steps=new_state.nonfinite_steps, nonfinite_cause=cause)
        return new_state, metrics

    return train_step


def compile_train_step(train_step: Callable, layout: StateLayout, mesh: Mesh, rules: Rules) -> Callable:
    """jit with the state's shardings in and out; the old state's buffers are donated."""
    batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))
    return jax.jit(
        with_rules(train_step, mesh, rules),
        in_shardings=(layout.shardings, batch_spec),
        out_shardings=(layout.shardings, replicated(mesh)),
        donate_argnums=(0,),
    )

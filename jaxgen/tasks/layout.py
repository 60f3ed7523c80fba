"""A task's models placed on a mesh: graph definitions, abstract parameters and their shardings, per group.

The shapes come from `jax.eval_shape`, the shardings from the logical axes the
model code names, so nothing is allocated until the caller asks. Training
builds its state on this (adding optimizer state and averages); evaluation,
generation, export and import need nothing more.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxgen.device_memory import bytes_per_device
from jaxgen.sharding import BATCH_AXES, Rules, logical_axes, param_shardings, replicated, with_rules
from jaxgen.tasks.base import Task, Weights


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    graphdefs: dict[str, nnx.GraphDef]
    abstract: dict[str, Any]  # ShapeDtypeStructs of every group's parameters
    shardings: dict[str, Any]  # NamedShardings, same structure
    axes: frozenset[str] = frozenset()  # the logical axis names the parameters carry

    @property
    def target(self) -> dict[str, Any]:
        """ShapeDtypeStructs carrying the shardings: checkpoints restore straight into them."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.shardings)

    def bytes_per_device(self) -> int:
        return bytes_per_device(self.target)

    def weights(self, params: dict[str, Any]) -> Weights:
        return Weights(self.graphdefs, params)


MAIN_GROUP = "model"  # the group of a one-model task


def group_rng(seed: int, group: str) -> jax.Array:
    """Each group's initialisation key, fixed by the seed and the group's name (not by which others exist).

    A one-model task's `model` takes the seed's key itself, as it always has.
    """
    key = jax.random.PRNGKey(seed)
    return key if group == MAIN_GROUP else jax.random.fold_in(key, zlib.crc32(group.encode()) & 0x7FFFFFFF)


def fresh_params(task: Task, seed: int) -> dict[str, Any]:
    """Every group's initial parameters as pure pytrees (traceable: run it under jit with out_shardings)."""
    return {group: nnx.to_pure_dict(nnx.split(spec.build(nnx.Rngs(params=group_rng(seed, group))))[1])
            for group, spec in task.models().items()}


def plan_models(task: Task, mesh: Mesh, rules: Rules, seed: int) -> ModelLayout:
    """Graph definitions, parameter shapes and shardings of every group; nothing is allocated."""
    graphdefs, abstract, shardings, axes = {}, {}, {}, set()
    for group, spec in task.models().items():
        rng = group_rng(seed, group)
        graphdef, state = nnx.eval_shape(lambda spec=spec, rng=rng: nnx.split(spec.build(nnx.Rngs(params=rng))))
        graphdefs[group] = graphdef
        axes |= logical_axes(state)
        shardings[group] = param_shardings(state, mesh, rules, "" if group == MAIN_GROUP else f"{group}/")
        abstract[group] = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
    return ModelLayout(graphdefs=graphdefs, abstract=abstract, shardings=shardings, axes=frozenset(axes))


def compile_eval_step(task: Task, layout: ModelLayout, mesh: Mesh, rules: Rules):
    """(params by group, global batch) -> (loss sum, weight sum), jitted with the parameters' shardings."""

    def eval_step(params: dict, batch: dict):
        return task.eval_loss(layout.weights(params).models(), batch)

    batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))
    return jax.jit(with_rules(eval_step, mesh, rules), in_shardings=(layout.shardings, batch_spec),
                   out_shardings=replicated(mesh))


def held_out_sums(eval_step, params: dict, global_batches: list[dict]) -> tuple[float, float]:
    """(summed loss, summed weight) over fixed held-out batches; the training loop and `jaxgen eval` share it."""
    sums = [eval_step(params, batch) for batch in global_batches]
    loss_sum, weight_sum = (float(sum(x)) for x in zip(*jax.device_get(sums)))
    return loss_sum, weight_sum

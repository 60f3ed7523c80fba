"""Assemble everything a run needs on a mesh: task, optimizers, state layout, jitted steps.

One function serves the loop, the tests and the benchmarks, so they all train
exactly the same program.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import optax
from jax.sharding import Mesh

from jaxgen.config import Config
from jaxgen.errors import ConfigError
from jaxgen.sharding import Rules, idle_mesh_axes, presets_splitting, refuse_unknown_rules, resolve_rules
from jaxgen.tasks import Task, make_task
from jaxgen.tasks.layout import compile_eval_step
from jaxgen.train.optimizer import learning_rate_schedule, make_optimizer
from jaxgen.train.state import StateLayout, TrainState, init_state, plan_state
from jaxgen.train.step import compile_train_step, make_train_step

log = logging.getLogger("jaxgen")


@dataclasses.dataclass(frozen=True)
class Training:
    cfg: Config
    mesh: Mesh
    rules: Rules
    task: Task
    txs: dict[str, optax.GradientTransformation]  # one optimizer per trained group
    layout: StateLayout
    train_step: Callable  # (state, global batch) -> (state, metrics); donates state
    eval_step: Callable  # (params by group, global batch) -> (loss sum, weight sum)

    def init_state(self) -> TrainState:
        return init_state(self.task, self.txs, self.layout, self.cfg.train.seed)


def build_training(cfg: Config, mesh: Mesh, task: Task | None = None) -> Training:
    rules = resolve_rules(cfg.sharding.preset, cfg.sharding.rules)
    task = task or make_task(cfg)
    specs = task.models()
    trained = [group for group, spec in specs.items() if spec.trained]
    for phase in task.phases():
        if frozen := [group for group in phase.trains if group not in trained]:
            raise ConfigError(f"phase {phase.name!r} trains {frozen}, which the task declares frozen")
    # Every trained group has an optimizer of its own (its own moments), made from the config's
    # `optimizer:` section unless the task gives the group settings of its own.
    txs = {group: make_optimizer(specs[group].optimizer or cfg.optimizer, cfg.train.steps)[0] for group in trained}
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    layout = plan_state(task, txs, mesh, rules, cfg.train.seed)
    refuse_unknown_rules(cfg.sharding.rules, set(layout.models.axes))
    for axis in idle_mesh_axes(dict(mesh.shape), rules, set(layout.models.axes)):
        log.warning("mesh.%s=%d: sharding.preset=%s splits no parameter of this model over the %s axis, so its %d "
                    "devices all compute the same; give them to mesh.data, or use sharding.preset=%s (or "
                    "sharding.rules)", axis, mesh.shape[axis], cfg.sharding.preset, axis, mesh.shape[axis],
                    " or ".join(presets_splitting(axis)))
    train_step = make_train_step(task, txs, schedule, layout.models.graphdefs, cfg.train.microbatches)
    return Training(
        cfg=cfg, mesh=mesh, rules=rules, task=task, txs=txs, layout=layout,
        train_step=compile_train_step(train_step, layout, mesh, rules),
        eval_step=compile_eval_step(task, layout.models, mesh, rules),
    )

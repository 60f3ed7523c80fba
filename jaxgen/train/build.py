"""Assemble everything a run needs on a mesh: task, optimizer, state layout, jitted steps.

One function serves the loop, the tests and the benchmarks, so they all train
exactly the same program.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import optax
from jax.sharding import Mesh

from jaxgen.config import Config
from jaxgen.sharding import Rules, resolve_rules
from jaxgen.train.optimizer import make_optimizer
from jaxgen.train.state import StateLayout, TrainState, init_state, plan_state
from jaxgen.train.step import compile_eval_step, compile_train_step, make_eval_step, make_train_step
from jaxgen.train.tasks import Task, make_task


@dataclasses.dataclass(frozen=True)
class Training:
    cfg: Config
    mesh: Mesh
    rules: Rules
    task: Task
    tx: optax.GradientTransformation
    layout: StateLayout
    train_step: Callable  # (state, global batch) -> (state, metrics); donates state
    eval_step: Callable  # (params, global batch) -> (loss sum, weight sum)

    def init_state(self) -> TrainState:
        return init_state(self.task, self.tx, self.layout, self.cfg.train.seed)


def build_training(cfg: Config, mesh: Mesh, task: Task | None = None) -> Training:
    rules = resolve_rules(cfg.sharding.preset, cfg.sharding.rules)
    task = task or make_task(cfg)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    layout = plan_state(task, tx, mesh, rules, cfg.train.seed)
    train_step = make_train_step(task, tx, schedule, layout.graphdef, cfg.train.microbatches)
    return Training(
        cfg=cfg, mesh=mesh, rules=rules, task=task, tx=tx, layout=layout,
        train_step=compile_train_step(train_step, layout, mesh, rules),
        eval_step=compile_eval_step(make_eval_step(task, layout.graphdef), layout, mesh, rules),
    )

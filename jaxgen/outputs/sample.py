"""`jaxgen sample`: the run's task generates (text for a language model, image grids for a DiT).

The options a family takes are the task's `sample_options`; one given to a
run of another family is refused, naming the run's kind and its options.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

from jaxgen.distributed import stop_together
from jaxgen.errors import UsageError
from jaxgen.outputs.runs import load_run_config, open_run, require_checkpoint
from jaxgen.tasks import make_task


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def sample_run(run_dir: str | pathlib.Path, given: dict[str, Any], seed: int = 0, step: int | None = None,
               overrides: list[str] = (), on_text: Callable[[str], None] | None = None) -> list[dict]:
    """`given`: options set by the user (None = not given); returns the records to print."""
    cfg = load_run_config(run_dir, overrides)
    task = make_task(cfg)  # once: a text-to-image task loads its frozen text encoder's checkpoint
    accepted = task.sample_options
    foreign = [name for name, value in given.items() if value is not None and name not in accepted]
    if foreign:  # before the restore, the expensive part
        raise UsageError(f"{', '.join(map(flag, foreign))} cannot be used with {run_dir}, a model.kind="
                         f"{cfg.model.kind} run; its options: {', '.join(map(flag, accepted))}")
    options = {name: default if given.get(name) is None else given[name] for name, default in accepted.items()}
    task.check_sample_options(options)  # before the restore, the expensive part
    stop_together(lambda: require_checkpoint(pathlib.Path(run_dir)))  # the commoner mistake is named first
    stop_together(lambda: task.check_sample_inputs(options, pathlib.Path(run_dir)))
    run = open_run(run_dir, step, overrides)
    return run.task.generate(run.weights, run.run_dir, run.step, {**options, "seed": seed}, on_text)

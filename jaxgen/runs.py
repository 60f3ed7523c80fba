"""Open a finished (or running) run directory: its config, a checkpoint's params, on the devices present.

Shared by `jaxgen eval`, `sample` and `export`: the checkpoint is restored
straight into shardings for the current devices (pure data parallel unless the
caller overrides the mesh), whatever mesh it was written on.
"""

from __future__ import annotations

import dataclasses
import pathlib

from jaxgen.checkpoint import checkpoint_dir, restore_params
from jaxgen.config import Config, load_config
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.sharding import make_mesh
from jaxgen.train.build import Training, build_training

# Replicated params and a batch split over every device: works for any checkpoint
# that fits one device; pass mesh.* overrides for larger ones.
DEFAULT_MESH = ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"]


@dataclasses.dataclass
class OpenedRun:
    run_dir: pathlib.Path
    cfg: Config
    training: Training
    step: int
    params: dict


def committed_steps(run_dir: pathlib.Path) -> list[int]:
    directory = checkpoint_dir(run_dir)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def load_run_config(run_dir: str | pathlib.Path, overrides: list[str] = ()) -> Config:
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a jaxgen run directory (no config.yaml)")
    return load_config(run_dir / "config.yaml", [*DEFAULT_MESH, *overrides])


def open_run(run_dir: str | pathlib.Path, step: int | None = None, overrides: list[str] = ()) -> OpenedRun:
    """The run's config and the params of checkpoint `step` (default: the latest)."""
    run_dir = pathlib.Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    steps = committed_steps(run_dir)
    if not steps:
        raise CheckpointError(f"run directory {str(run_dir)!r} holds no checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"run directory {str(run_dir)!r} has no checkpoint for step {step}; available: {steps}")
    training = build_training(cfg, make_mesh(cfg.mesh))
    params = restore_params(checkpoint_dir(run_dir) / str(step), training.layout, use_ema=True)
    return OpenedRun(run_dir=run_dir, cfg=cfg, training=training, step=step, params=params)

"""Is `--run-dir` a run, and does it hold checkpoint `--step`? Answered from file names alone, so that
`eval`, `sample` and `export` refuse a wrong path or step before JAX starts (`jaxgen.commands`), and
again as the run is opened (`runs`): the run may be training meanwhile."""

from __future__ import annotations

import errno
import pathlib

from jaxgen.checkpoint_layout import checkpoint_dir, committed_steps
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.files import RUN_LOCK_FILE, describe_holder, lock_holder, trial_file_fails


def unrecordable(run_dir: pathlib.Path) -> str | None:
    """Why a reader cannot record what it found in run directory `run_dir` (a read-only file system, another
    user's run: it can show its results, not keep them), tried with a trial file as a write would; else None."""
    err = trial_file_fails(run_dir)
    if err is not None and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (err.strerror or str(err)).lower()
    return None


def check_run_dir(run_dir: str | pathlib.Path) -> None:
    """A run directory holds config.yaml; a checkpoint's or the checkpoints' directory is named as what it is."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} " + ("is a file" if run_dir.exists() else "does not exist"))
    if (run_dir / "config.yaml").is_file():
        return
    owner = run_dir.absolute().parent.parent
    if run_dir.absolute().parent.name == "checkpoints" and (owner / "config.yaml").is_file():
        run = run_dir.parent.parent
        raise ConfigError(f"{str(run_dir)!r} is a checkpoint of run {str(run)!r}, not a run directory; give "
                          f"--run-dir {str(run)!r}" + (f" --step {run_dir.name}" if run_dir.name.isdigit() else ""))
    if run_dir.absolute().name == "checkpoints" and (run_dir.absolute().parent / "config.yaml").is_file():
        raise ConfigError(f"{str(run_dir)!r} holds the checkpoints of run {str(run_dir.parent)!r}; give --run-dir "
                          f"{str(run_dir.parent)!r}")
    holder = lock_holder(run_dir / RUN_LOCK_FILE)
    if holder:  # config.yaml is written once the run's first step compiles
        raise ConfigError(f"{str(run_dir)!r} holds no config.yaml yet: {describe_holder(holder)}, which started "
                          "the run there, writes it once the first step compiles (if that process stopped before, "
                          "its train command starts the run again)")
    raise ConfigError(f"{str(run_dir)!r} is not a jaxgen run directory (no config.yaml)")


def require_checkpoint(run_dir: pathlib.Path) -> list[int]:
    """The run's committed steps; none is an error, which readers report before anything else about the run."""
    steps = committed_steps(checkpoint_dir(run_dir))
    if not steps:
        raise CheckpointError(f"run directory {str(run_dir)!r} holds no checkpoint")
    return steps


def check_step(run_dir: pathlib.Path, step: int | None) -> int:
    """Checkpoint `step` of the run (default: the newest), which must be committed."""
    steps = require_checkpoint(run_dir)
    if step is None:
        return steps[-1]
    if step not in steps:
        # A reader asking for a step the run listed a moment ago: training's retention may have deleted it since.
        retention = (" (if it was saved, the run's retention, checkpoint.keep and keep_every, has deleted it since: "
                     "a run deletes older checkpoints as it saves)" if step < steps[-1] else "")
        raise CheckpointError(f"run directory {str(run_dir)!r} has no checkpoint for step {step}; available: "
                              f"{steps}{retention}")
    return step


def check_outside_checkpoints(out: str | pathlib.Path, flag: str) -> None:
    """Nothing is written into a run's checkpoints directory: the run renames what it cannot read there
    (`.damaged`) and its retention deletes steps."""
    out = pathlib.Path(out).absolute()
    for folder in (out, *out.parents):
        if folder.name == "checkpoints" and (folder.parent / "config.yaml").is_file():
            raise ConfigError(f"{flag} {str(out)!r} is inside the checkpoints of run {str(folder.parent)!r}, which "
                              "the run renames and deletes; give a directory outside them")

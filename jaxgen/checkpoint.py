"""Checkpoints: Orbax `CheckpointManager` for the train state, data position and run metadata.

A checkpoint at `RUN_DIR/checkpoints/<step>/` holds three items:
  state  the whole TrainState (params, optimizer state, step, RNG, counters)
  data   every process's data-iterator state (JSON), so batches resume exactly
  meta   the resolved config, the tokenizer's hash and path, the process count

Saves are asynchronous and atomic (Orbax writes a temporary directory and
renames it on commit), so a process killed mid-save leaves the previous
checkpoint loadable. Restores go through abstract arrays that carry the
*current* shardings: a checkpoint written on one mesh loads onto any other,
each device reading only its own shards.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jaxgen.config import CheckpointConfig
from jaxgen.errors import CheckpointError, CheckpointWriteError
from jaxgen.sharding import param_path
from jaxgen.train.state import StateLayout, TrainState

log = logging.getLogger("jaxgen")

ITEMS = ("state", "data", "meta")


def _handlers() -> dict:
    # Named up front so a fresh manager can read metadata before any restore.
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def checkpoint_dir(run_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(run_dir).absolute() / "checkpoints"


def abstract_target(layout: StateLayout) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: Orbax restores straight into them."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), layout.abstract, layout.shardings
    )


class Checkpointer:
    def __init__(self, directory: pathlib.Path, cfg: CheckpointConfig):
        self.cfg = cfg
        self.directory = pathlib.Path(directory)
        keep = [policies.LatestN(cfg.keep)]
        if cfg.keep_every:
            keep.append(policies.EveryNSteps(cfg.keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=cfg.async_save,
            # Leftovers of a save that died half-way are removed, never loaded.
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
        self._last_save_time = time.monotonic()

    # ------------------------------------------------------------------ when
    def due(self, step: int, final: bool) -> bool:
        """Save now? Every process must get the same answer, so the clock is process 0's."""
        if final or (self.cfg.every and step % self.cfg.every == 0):
            return True
        if not self.cfg.every_minutes:
            return False
        elapsed = time.monotonic() - self._last_save_time >= 60 * self.cfg.every_minutes
        if jax.process_count() > 1:
            elapsed = bool(multihost_utils.broadcast_one_to_all(np.asarray(elapsed)))
        return elapsed

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: TrainState, data_state: dict, meta: dict) -> None:
        """Start an asynchronous save; returns once the arrays are copied off the devices."""
        if step in self.manager.all_steps():
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"processes": gather_process_states(data_state)}),
            meta=ocp.args.JsonSave(meta),
        )
        self._surface_write_errors(lambda: self.manager.save(step, args=args, force=True))
        self._last_save_time = time.monotonic()

    def wait(self) -> None:
        """Block until every started save is durable; raises CheckpointWriteError if one failed."""
        self._surface_write_errors(self.manager.wait_until_finished)
        self._surface_write_errors(self.manager.check_for_errors)

    def _surface_write_errors(self, action) -> None:
        # A background write fails far from its cause; say where, and what is still safe.
        try:
            action()
        except Exception as err:
            committed = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
            safe = f"step {committed[-1]} is intact" if committed else "no earlier checkpoint exists"
            reason = str(err).splitlines()[0][:400]
            raise CheckpointWriteError(f"writing a checkpoint to {self.directory} failed: {reason}; {safe}") from err

    def close(self) -> None:
        self.manager.close()

    # ------------------------------------------------------------------ restore
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, layout: StateLayout, step: int | None = None) -> tuple[TrainState, dict, dict]:
        """(state in the layout's shardings, this process's data state, meta)."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; available: {list(self.manager.all_steps())}"
            )
        check_shapes(self.manager.item_metadata(step)["state"], layout, f"{self.directory}/{step}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_target(layout)),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        processes = restored["data"]["processes"]
        if len(processes) != jax.process_count():
            raise CheckpointError(
                f"checkpoint {step} was written by {len(processes)} processes, this run has {jax.process_count()}; "
                "the model state reshards, but each process's data position cannot be re-split"
            )
        return restored["state"], processes[jax.process_index()], restored["meta"]


def gather_process_states(local: dict) -> list[dict]:
    """Every process's data-iterator state, in process order (identical on all processes)."""
    if jax.process_count() == 1:
        return [local]
    encoded = np.frombuffer(json.dumps(local).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([encoded.size]))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(rows, lengths.reshape(-1))]


def check_shapes(saved_metadata: Any, layout: StateLayout, where: str) -> None:
    """Refuse a checkpoint of another shape, listing every parameter that differs."""
    saved = _shapes_by_path(saved_metadata.params if hasattr(saved_metadata, "params") else saved_metadata["params"])
    wanted = _shapes_by_path(layout.abstract.params)
    problems = [
        f"  {path}: checkpoint {saved.get(path, 'missing')}, model {wanted.get(path, 'missing')}"
        for path in sorted(set(saved) | set(wanted))
        if saved.get(path) != wanted.get(path)
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {where} does not fit this model ({len(problems)} parameters differ):\n" + "\n".join(problems)
        )


def _shapes_by_path(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {param_path(path): tuple(leaf.shape) for path, leaf in leaves}


def restore_params(path: str | pathlib.Path, layout: StateLayout, use_ema: bool = False) -> dict:
    """Parameters only, from a run directory (latest step) or one step directory.

    `use_ema`: the parameter average instead, where the checkpoint has one (what
    sampling and evaluation use); fine-tuning starts from the parameters themselves.
    """
    path = pathlib.Path(path).absolute()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    step = None
    if path.name.isdigit() and (path / "state").is_dir():
        path, step = path.parent, int(path.name)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.init_from={str(path)!r} is not a run or checkpoint directory")
    # The PyTree handler (not the Standard one) can restore a subtree: params without optimizer state.
    handlers = {**_handlers(), "state": ocp.PyTreeCheckpointHandler()}
    manager = ocp.CheckpointManager(path, item_handlers=handlers, options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"checkpoint.init_from={str(path)!r} holds no checkpoint")
    metadata = manager.item_metadata(step)["state"]
    check_shapes(metadata, layout, f"{path}/{step}")
    key = "ema_params" if use_ema and _has_ema(metadata) else "params"
    target = {key: abstract_target(layout).params}
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target,
            restore_args=jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target),
            partial_restore=True,
        ))
    )
    manager.close()
    log.info("loaded %s from %s step %d", key, path, step)
    return restored["state"][key]


def _has_ema(metadata) -> bool:
    ema = metadata.get("ema_params") if hasattr(metadata, "get") else getattr(metadata, "ema_params", None)
    return bool(ema)

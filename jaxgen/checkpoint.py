"""Checkpoints of any pytree of arrays, with the data position and run metadata, verified on restore.

A checkpoint at `DIR/<step>/` holds three Orbax items and a checksum file:
  state                 the pytree (for training: the whole TrainState)
  data                  every process's data-iterator state (JSON), so batches resume exactly
  meta                  the caller's metadata (JSON)
  jaxgen_checksums.json per array its shape, dtype, two sharding-independent
                        hashes and an all-finite flag; hashes of `data` and
                        `meta`; and a hash of the file itself

Saves are asynchronous: the loop waits only for the device-to-host copy. The
array hashes are computed on the devices, queued before the next train step,
and fetched by Orbax's background thread, which writes the checksum file into
the temporary directory just before Orbax renames it into place. So a
checkpoint is committed with its checksums or not at all, and a state holding
a non-finite value is never committed.

A restore is verified: every value read must hash to what was saved, or the
checkpoint counts as damaged. The training run falls back to the newest intact
checkpoint (renaming damaged ones to `<step>.damaged`); readers refuse a
damaged one. Retention is ours, not Orbax's: old steps are renamed out of sight
before they are deleted, so a reader sees a step whole or not at all, and the
newest checkpoint this process has read back intact is kept until a newer one
has been.

Restores go through abstract arrays carrying the *current* shardings: a
checkpoint written on one mesh loads onto any other.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import json
import logging
import os
import pathlib
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxgen.checkpoint_layout import CHECKSUMS, committed_steps, step_dirs
from jaxgen.config import CheckpointConfig
from jaxgen.distributed import from_every_process, stop_together
from jaxgen.errors import (
    CheckpointError,
    CheckpointWriteError,
    NonFiniteError,
    first_line,
    listed,
    lost_a_peer,
    os_error_words,
    system_error_code,
)
from jaxgen.files import absolute, write_atomic
from jaxgen.integrity import differing, json_digest, start_tree_digest, tree_digest

log = logging.getLogger("jaxgen")

DAMAGED_SUFFIX = ".damaged"
_DELETING_PREFIX = ".deleting-"
_ORBAX_TEMPORARY = ".orbax-checkpoint-tmp"


class DamagedCheckpoint(CheckpointError):
    """A checkpoint that cannot be read back as it was saved; the message says what is wrong."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint of another model (other array shapes or dtypes); the message lists them."""

    problems: list[str] = []  # each array that differs, as "path: checkpoint SHAPE, model SHAPE"


def _handlers(state_handler=None) -> dict:
    # Named up front so a fresh manager can read any item before a restore names it.
    return {
        "state": state_handler or ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


@dataclasses.dataclass
class _PendingChecksums:
    step: int
    digests: Callable[[], dict[str, dict]]  # waits for the device computation
    shapes: dict[str, dict]
    data_sha256: str
    meta_sha256: str

    def file_contents(self) -> dict:
        arrays = self.digests()
        bad = [path for path, digest in arrays.items() if not digest["finite"]]
        if bad:
            raise NonFiniteError(
                f"refused to commit checkpoint {self.step}: non-finite values in {', '.join(bad[:5])}"
                f"{' and more' if len(bad) > 5 else ''}")
        contents = {"arrays": {p: {**self.shapes[p], **arrays[p]} for p in arrays},
                    "data_sha256": self.data_sha256, "meta_sha256": self.meta_sha256}
        return {**contents, "self_sha256": json_digest(contents)}


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_states: list[dict]  # every process's that saved it, in process order
    meta: dict


def _bytes_under(directory: pathlib.Path) -> int:
    """What the files under `directory` take (their sizes; 0 for one removed meanwhile)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _free_space(directory: pathlib.Path) -> str:
    from jaxgen.device_memory import human_bytes

    try:
        return f"{human_bytes(shutil.disk_usage(directory).free)} free there now"
    except OSError:
        return "its free space unknown"


class Checkpointer:
    """Saves and restores one directory of checkpoints.

    `writer`: this object may rename damaged checkpoints and apply retention
    (the training run that holds the run directory's lock); readers pass False.
    """

    def __init__(self, directory: pathlib.Path, cfg: CheckpointConfig, writer: bool = True):
        self.cfg = cfg
        self.writer = writer
        self.directory = absolute(directory)  # as the kernel reads any ".." (TensorStore would read it as text)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save,
            # Leftovers of a save that died half-way are removed, never loaded.
            cleanup_tmp_directories=writer,
            create=writer,
            read_only=not writer,
        )
        self._pending: collections.deque[_PendingChecksums] = collections.deque()
        if writer and cfg.async_save:
            options.async_options = ocp.AsyncOptions(timeout_secs=max(1, round(cfg.save_timeout_minutes * 60)),
                                                     post_finalization_callback=self._write_checksums_before_commit)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
        self._verified_step: int | None = None  # newest step this process read back intact
        self._closed = False
        if writer and jax.process_index() == 0:
            for leftover in self.directory.glob(f"{_DELETING_PREFIX}*"):  # a deletion a kill interrupted
                shutil.rmtree(leftover, ignore_errors=True)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Start an asynchronous save; returns once the arrays are copied off the devices."""
        if step in step_dirs(self.directory):
            return
        digests = start_tree_digest(state)  # queued before the caller's next step can donate the arrays
        shapes = {path: {"shape": list(leaf.shape), "dtype": str(leaf.dtype)}
                  for path, leaf in zip(_named_leaves(state), jax.tree.leaves(state))}
        data = {"processes": gather_process_states(data_state)}
        self._surface_write_errors(self.manager.wait_until_finished)  # Orbax would wait for it anyway
        self._apply_retention()
        stop_together(lambda: self._refuse_without_room(step, state))
        pending = _PendingChecksums(step, digests, shapes, json_digest(data), json_digest(meta))
        self._pending.append(pending)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta))
        try:
            self._surface_write_errors(lambda: self.manager.save(step, args=args, force=True))
        except BaseException:
            self._pending.clear()
            raise
        if not self.cfg.async_save:  # committed already: the checksums follow (readers wait for them)
            self._pending.popleft()
            self._write_checksums(self.directory / str(step), pending)

    def _refuse_without_room(self, step: int, state: Any) -> None:
        """A save the disk has no room for is refused before it starts. Started, it fails on the hosts whose
        write fails, while the others wait for them in Orbax's barrier until checkpoint.save_timeout_minutes
        (in one process, the failure surfaces only at the next save). The bound is what the newest checkpoint
        takes on disk (the next holds as many numbers, compressed alike), or before the first, half of the
        state's arrays: Orbax compresses, so their size alone could refuse a save that fits."""
        if not self.writer:
            return
        try:
            usage = shutil.disk_usage(self.directory)
        except OSError:  # where the disk cannot say, the write will
            return
        if usage.total == 0:  # a file system that reports no sizes at all (some FUSE mounts of object stores)
            return
        free = usage.free
        steps = committed_steps(self.directory)
        size = (_bytes_under(self.directory / str(steps[-1])) if steps
                else sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(state)))
        if free < (size if steps else size // 2):
            from jaxgen.device_memory import human_bytes

            taken = f"checkpoint {steps[-1]} takes {human_bytes(size)}" if steps else \
                f"the state's arrays are {human_bytes(size)}"
            safe = f"step {steps[-1]} is intact" if steps else "no earlier checkpoint exists"
            # Only where older checkpoints are kept could keeping fewer make room.
            fewer = f" (or keep fewer than the {len(steps)} kept now: checkpoint.keep={len(steps) - 1})" \
                if len(steps) > 1 else ""
            raise CheckpointWriteError(
                f"no room for checkpoint {step} in {self.directory}: {human_bytes(free)} free there, and {taken}; "
                f"free space there{fewer}; {safe}",
                os_error_words(errno.ENOSPC), errno.ENOSPC)

    def _write_checksums_before_commit(self) -> None:
        """Orbax's background thread, after the items are written and before the rename that commits them."""
        pending = self._pending.popleft()
        temporary = sorted(self.directory.glob(f"{pending.step}{_ORBAX_TEMPORARY}*"))
        if len(temporary) != 1:
            raise CheckpointWriteError(f"cannot find the directory Orbax is writing step {pending.step} to "
                                       f"(found {[p.name for p in temporary]})")
        self._write_checksums(temporary[0], pending)

    def _write_checksums(self, step_dir: pathlib.Path, pending: _PendingChecksums) -> None:
        contents = pending.file_contents()  # every process waits for the digests it took part in
        if jax.process_index() == 0:
            write_atomic(step_dir / CHECKSUMS, json.dumps(contents))

    def wait(self) -> None:
        """Block until every started save is durable; raises CheckpointWriteError if one failed."""
        self._surface_write_errors(self.manager.wait_until_finished)
        self._surface_write_errors(self.manager.check_for_errors)
        self._apply_retention()

    def _surface_write_errors(self, action) -> None:
        # A background write fails far from its cause; say where, and what is still safe.
        try:
            action()
        except NonFiniteError:
            raise
        except Exception as err:
            if isinstance(err.__cause__, NonFiniteError) or isinstance(err.__context__, NonFiniteError):
                raise (err.__cause__ or err.__context__) from None
            committed = committed_steps(self.directory)
            safe = f"step {committed[-1]} is intact" if committed else "no earlier checkpoint exists"
            code = system_error_code(err)
            reason = os_error_words(code, self.directory) if code else first_line(err, 400)
            if "Barrier timed out" in str(err):  # a process's own write error stays behind the barrier
                reason = (f"the processes did not all finish their parts within checkpoint.save_timeout_minutes="
                          f"{self.cfg.save_timeout_minutes:g} (a write that failed on some host, e.g. a full disk, "
                          f"or one slower than that; {_free_space(self.directory)})")
            raise CheckpointWriteError(f"writing a checkpoint to {self.directory} failed: {reason}; {safe}",
                                       reason, code) from err

    def _apply_retention(self) -> None:
        """Delete what neither `keep`, `keep_every` nor the newest read-back-intact checkpoint holds."""
        if not self.writer:
            return
        steps = committed_steps(self.directory) if jax.process_index() == 0 else []
        keep = set(steps[-self.cfg.keep:])
        keep |= {s for s in steps if self.cfg.keep_every and s % self.cfg.keep_every == 0}
        if self._verified_step is not None:
            keep.add(self._verified_step)
        for step in steps:
            if step not in keep:
                # Renamed first: a reader sees the whole step or none of it.
                doomed = self.directory / f"{_DELETING_PREFIX}{step}-{os.getpid()}"
                os.rename(self.directory / str(step), doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxgen checkpoint retention")
        self.manager.reload()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            # Orbax's close() does not wait for the clean-up of temporary directories it starts
            # on opening: a run refused at once would leave it to fail at interpreter shutdown,
            # printing a traceback after the one-line error.
            await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
            if await_cleanup is not None:
                await_cleanup()
            self.manager.close()

    # ------------------------------------------------------------------ restore
    def steps(self) -> list[int]:
        """Every numbered step directory, committed with checksums or not (the writer's view)."""
        return step_dirs(self.directory)

    def restore(self, target: Any, step: int) -> Restored:
        """Checkpoint `step` read into `target`'s shardings and verified.

        `target`: a pytree of jax.ShapeDtypeStruct with shardings, shaped like
        the saved pytree. Raises DamagedCheckpoint if anything read differs
        from what was saved, CheckpointError if it does not fit `target`.
        """
        where = f"checkpoint {self.directory}/{step}"
        checksums = _read_checksums(self.directory / str(step), where)
        meta = _read_meta(self.manager, step, where, checksums)
        check_fits(checksums, target, where)
        restored = _damage_as_error(where, lambda: self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())))
        if json_digest(restored["data"]) != checksums["data_sha256"]:
            raise DamagedCheckpoint(f"{where} is damaged: its data-iterator state does not match its checksum")
        _verify_arrays(restored["state"], checksums, where)
        if self.writer:
            self._verified_step = step
        return Restored(step, restored["state"], restored["data"]["processes"], meta)

    def restore_newest_intact(self, target: Any) -> Restored | None:
        """The newest checkpoint that reads back intact, or None if no step was committed.

        A damaged newer one is renamed to `<step>.damaged` with a warning saying
        what was wrong. If every committed step is damaged, nothing is renamed
        and DamagedCheckpoint lists them: starting over would silently discard them.
        """
        damaged: dict[int, str] = {}
        for step in reversed(self.steps()):
            try:
                restored = self.restore(target, step)
            except DamagedCheckpoint as err:
                damaged[step] = str(err)
            if not on_every_process(step not in damaged):  # one process's read failing fails them all
                damaged.setdefault(step, f"checkpoint {self.directory}/{step} could not be read by another process")
                continue
            for bad_step, reason in damaged.items():
                self._set_aside(bad_step, reason)
            return restored
        if damaged:
            raise DamagedCheckpoint(
                f"every checkpoint in {self.directory} is damaged: " + "; ".join(damaged.values())
                + f". Move {self.directory} aside to start again from step 0")
        return None

    def _set_aside(self, step: int, reason: str) -> None:
        log.warning("%s; falling back to an earlier checkpoint", reason)
        if not self.writer or jax.process_index() != 0:
            return
        target = self.directory / f"{step}{DAMAGED_SUFFIX}"
        n = 1
        while target.exists():
            target, n = self.directory / f"{step}{DAMAGED_SUFFIX}.{n}", n + 1
        os.rename(self.directory / str(step), target)
        log.warning("renamed the damaged checkpoint to %s (kept for inspection; delete it when done)", target)


def on_every_process(ok: bool) -> bool:
    """Whether `ok` holds on every process (each may read other shards of a checkpoint, and find other damage)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _damage_as_error(where: str, read):
    """Run `read`; any failure to read (missing or garbled files, decoder errors) is damage."""
    try:
        return read()
    except CheckpointError:
        raise
    except Exception as err:
        reason = read_failure(err)
        if lost_a_peer(reason):  # a collective of the read, not the files, failed
            raise CheckpointError(f"reading {where} stopped: another process of the run stopped ({reason}); its "
                                  "own error says why") from None
        raise DamagedCheckpoint(f"{where} is damaged or incomplete: {reason}") from None


# TensorStore's words for a file it could not read: 'FAILED_PRECONDITION: Error reading "params.x.kernel/0.0" in
# OCDBT database at local file "...": ZSTD_decompressStream() failed: Data corruption detected'.
_TENSORSTORE_READ = re.compile(r'Error reading "(?P<array>[^"/]+)[^"]*" in [^:]*?: (?P<reason>.+)')


def read_failure(err: BaseException) -> str:
    """One line saying why a read failed: the innermost of the chained errors (Orbax wraps TensorStore's reason,
    and names only a slice and an object's repr itself), with the array it was reading where TensorStore says."""
    chain = [err]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    # A StopIteration is a decoder's control flow (json's, under its "Expecting value"), not a reason.
    innermost = next((e for e in reversed(chain) if str(e).strip() and not isinstance(e, StopIteration)), err)
    line = (str(innermost).strip().splitlines() or [""])[0]
    if match := _TENSORSTORE_READ.search(line):
        return f"array {match['array']}: {match['reason']}"[:300]
    return f"{type(innermost).__name__}: {line}"[:300]


def _read_checksums(step_dir: pathlib.Path, where: str) -> dict:
    try:
        checksums = json.loads((step_dir / CHECKSUMS).read_bytes())
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{where} has no checksums (incomplete, or written by a jaxgen without them)") from None
    except (OSError, ValueError) as err:
        raise DamagedCheckpoint(f"{where} is damaged: its checksum file cannot be read ({err})") from None
    if not isinstance(checksums, dict) or json_digest(
            {k: v for k, v in checksums.items() if k != "self_sha256"}) != checksums.get("self_sha256"):
        raise DamagedCheckpoint(f"{where} is damaged: its checksum file does not match its own checksum")
    return checksums


def _read_meta(manager: ocp.CheckpointManager, step: int, where: str, checksums: dict) -> dict:
    return _checked_meta(_damage_as_error(where, lambda: manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]), checksums, where)


def _checked_meta(meta: dict, checksums: dict, where: str) -> dict:
    if json_digest(meta) != checksums["meta_sha256"]:
        raise DamagedCheckpoint(f"{where} is damaged: its metadata does not match its checksum")
    return meta


def check_fits(checksums: dict, target: Any, where: str, prefix: str = "") -> None:
    """Refuse a checkpoint of another shape, listing every array that differs (under `prefix` only)."""
    saved = {p: (tuple(a["shape"]), a["dtype"]) for p, a in checksums["arrays"].items() if p.startswith(prefix)}
    wanted = {prefix + p: (tuple(leaf.shape), str(leaf.dtype)) for p, leaf in _named_leaves(target).items()}
    problems = [  # parameters first: the optimizer state only follows them
        f"{path}: checkpoint {_shape_text(saved.get(path))}, model {_shape_text(wanted.get(path))}"
        for path in sorted(set(saved) | set(wanted), key=lambda p: (not p.startswith("params/"), p))
        if saved.get(path) != wanted.get(path)
    ]
    if problems:
        mismatch = CheckpointMismatch(f"{where} does not fit this model ({len(problems)} arrays differ): "
                                      + listed(problems, 6))
        mismatch.problems = problems
        raise mismatch


def _shape_text(entry: tuple | None) -> str:
    if entry is None:
        return "missing"
    shape, dtype = entry
    return f"{shape} {dtype}"


def _named_leaves(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _verify_arrays(tree: Any, checksums: dict, where: str, prefix: str = "") -> None:
    restored = {prefix + path: digest for path, digest in tree_digest(tree).items()}
    bad = differing(checksums["arrays"], restored)
    if bad:
        raise DamagedCheckpoint(
            f"{where} is damaged: {len(bad)} array{'s' if len(bad) > 1 else ''} read back "
            f"differ{'' if len(bad) > 1 else 's'} from what was saved "
            f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")


def gather_process_states(local: dict) -> list[dict]:
    """Every process's data-iterator state, in process order (identical on all processes)."""
    return [json.loads(raw) for raw in from_every_process(json.dumps(local).encode())]


def restore_subtree(path: str | pathlib.Path, keys: tuple[str, ...], target: Any, step: int | None = None,
                    what: str = "checkpoint") -> tuple[Any, str, int]:
    """One verified subtree of a saved state (e.g. `params`) without the rest: (subtree, its key, step).

    `keys`: the subtrees wanted, as "/"-separated paths in order of preference;
    the first one the checkpoint holds is read (("ema_params/model",
    "params/model"): the average if there is one). `path`: a run directory, its `checkpoints` directory or one step
    directory (then `step` must be None). Default step: the newest committed.
    Read only: a damaged checkpoint is refused, never renamed or replaced.
    `what` names the source in messages (e.g. "checkpoint.init_from='runs/a'").
    """
    # Every process must find it: one that cannot (a folder on another host's disk) stops them all, where it
    # used to leave the others to fail in the read's first collective, blaming the checkpoint.
    path, step, checksums, key = stop_together(lambda: _locate_subtree(path, keys, target, step, what))
    where = f"checkpoint {path}/{step}"
    subtree = target
    for part in reversed(key.split("/")):
        subtree = {part: subtree}
    # Only this step's directory is opened: a manager of the whole directory would list every step and
    # read each one's metadata, which fails when the writer's retention deletes another step meanwhile.
    restore_args = ocp.args.PyTreeRestore(
        subtree, restore_args=jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), subtree),
        partial_restore=True)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:  # PyTree (not Standard): restores a subtree
        restored = _damage_as_error(where, lambda: reader.restore(path / str(step) / "state", args=restore_args))
    for part in key.split("/"):
        restored = restored[part]
    _verify_arrays(restored, checksums, where, prefix=f"{key}/")
    log.info("loaded %s from %s step %d", key, path, step)
    return restored, key, step


def committed_checkpoint(path: str | pathlib.Path, step: int | None, what: str) -> tuple[pathlib.Path, int]:
    """(checkpoints directory, step) of the committed checkpoint `path` names: a run directory, its `checkpoints`
    directory or one step directory (then `step` must be None); default step: the newest. `what` names the
    source in messages."""
    path = absolute(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and ((path / "state").is_dir() or path.parent.name == "checkpoints"):
        path, step = path.parent, int(path.name)  # a step missing there is named below, with those there are
    if not path.is_dir():
        why = "is not a run or checkpoint directory" if path.exists() else "does not exist"
        raise CheckpointError(f"{what}: {str(path)!r} {why}")
    steps = committed_steps(path)
    if not steps:
        raise CheckpointError(f"{what}: {str(path)!r} holds no committed checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"{what}: {str(path)} has no checkpoint for step {step}; available: {steps}")
    return path, step


def _locate_subtree(path: str | pathlib.Path, keys: tuple[str, ...], target: Any, step: int | None,
                    what: str) -> tuple[pathlib.Path, int, dict, str]:
    """restore_subtree's checkpoint, before any read: its directory, step, checksums and the subtree's key."""
    path, step = committed_checkpoint(path, step, what)
    where = f"checkpoint {path}/{step}"
    checksums = _read_checksums(path / str(step), where)
    key = next((k for k in keys if any(p.startswith(f"{k}/") for p in checksums["arrays"])), keys[-1])
    check_fits(checksums, target, where, prefix=f"{key}/")
    return path, step, checksums, key


def read_step_meta(directory: pathlib.Path, step: int) -> dict:
    """The metadata checkpoint `step` in `directory` (a run's `checkpoints`) was saved with, verified against
    its checksum: the config it was trained with and its `inputs` (e.g. the tokenizer's digest)."""
    where = f"checkpoint {directory}/{step}"
    checksums = _read_checksums(directory / str(step), where)
    # This step only, as restore_subtree reads; and by this process alone: Orbax's reader ends with a barrier
    # of every process, where a caller on process 0 alone (eval's scored_before) waited for ever.
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    with ocp.Checkpointer(ocp.JsonCheckpointHandler(), multiprocessing_options=alone) as reader:
        meta = _damage_as_error(where, lambda: reader.restore((directory / str(step) / "meta").absolute()))
    return _checked_meta(meta, checksums, where)

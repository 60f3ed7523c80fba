"""A run directory's life: one writer at a time, and where a (re)start begins.

- `holding(run_dir)`: process 0 holds the directory's OS lock for the whole
  run; every process learns whether it got it, so a refused start stops all of
  them together. The lock dies with its holder, so a stale one is taken over.
  Another tool's directory holding files a run writes is refused, untouched.
  A directory the processes of a multi-process run do not share (each host's
  own disk) is refused before training: its checkpoints could never complete.
- `starting_point(...)`: the newest intact checkpoint to resume from (damaged
  newer ones are set aside with a warning), or a fresh start from step 0 (a run
  killed before its first checkpoint is simply started again), or the news that
  the run is already complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import shlex
import shutil
import time
from collections.abc import Iterator

import jax

from jaxgen.checkpoint import Checkpointer, CheckpointMismatch, Restored, read_step_meta
from jaxgen.checkpoint_layout import checkpoint_dir, committed_steps
from jaxgen.config import Config, as_saved_now, changed_settings, load_config, shown
from jaxgen.config_models import HOW_COMPUTED
from jaxgen.data.tokenizer import kept_tokenizer_files, tokenizer_file_in
from jaxgen.distributed import bytes_from_process_0, from_every_process
from jaxgen.errors import CheckpointError, ConfigError, DirectoryInUse, listed, on_every_process
from jaxgen.files import RUN_LOCK_FILE, DirectoryLock, describe_holder
from jaxgen.interrupts import undone_on_leaving

log = logging.getLogger("jaxgen")

LOCK_FILE = RUN_LOCK_FILE
# How long a process of a multi-process run looks for process 0's lock record in the run directory: an NFS
# client may trust its cached view of a directory for up to a minute (acdirmax).
SHARED_PATIENCE_S = 60.0
# What training writes into a run directory besides config.yaml, and may overwrite or delete there.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard", "samples", "evals", "eval.jsonl",
               "loss_curve.png")


def outputs_at_risk(run_dir: pathlib.Path, tokenizer: str | None = None) -> list[str]:
    """What training would overwrite in `run_dir` when it is not a jaxgen run's directory (else nothing).

    A run holds its lock file from its first moment (an imported one, config.yaml and checkpoints). Any
    other directory may be trained in (an empty one, or one holding only the config, a scheduler's log or
    the tokenizer the run is given, `tokenizer`), unless it holds something of the same name: an export's
    tokenizer, another tool's checkpoints.
    """
    if not run_dir.is_dir() or (run_dir / LOCK_FILE).exists():
        return []
    if (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints").is_dir():
        return []
    names = list(RUN_OUTPUTS)
    given = tokenizer and pathlib.Path(tokenizer).absolute()
    if not given or run_dir.absolute() not in (given, given.parent):  # a tokenizer given in place is kept as is
        names += [path.name for path in kept_tokenizer_files(run_dir)]
    return sorted(name for name in names if (run_dir / name).exists())


@contextlib.contextmanager
def holding(run_dir: pathlib.Path, tokenizer: str | None = None) -> Iterator[None]:
    """Hold `run_dir` (created if needed) for the duration of the block; raise DirectoryInUse if another
    process holds it, ConfigError if it is another tool's directory whose files training would overwrite
    (`tokenizer`: the one the run is given, which may already be there)."""
    lock, refusal, created = None, b"", False
    if jax.process_index() == 0:
        created = not run_dir.exists()
        at_risk = outputs_at_risk(run_dir, tokenizer)
        if at_risk:
            refusal = ("F" + f"--run-dir {str(run_dir)!r} is not a jaxgen run directory, and training would "
                       f"overwrite what it holds ({', '.join(at_risk)}); give a new or empty directory, or a run "
                       "directory to continue").encode()
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = DirectoryLock(run_dir / LOCK_FILE, f"run directory {str(run_dir)!r}",
                                 "wait for it to finish, or choose another --run-dir")
            try:
                previous = lock.acquire()
            except DirectoryInUse as err:
                lock, refusal = None, ("L" + str(err)).encode()
            else:
                if previous:
                    log.info("took over the lock of %s, which is no longer running", describe_holder(previous))
    refusal = bytes_from_process_0(refusal).decode()
    if refusal:
        raise (ConfigError if refusal[0] == "F" else DirectoryInUse)(refusal[1:])
    kept = False
    # A start left at once (Ctrl-C, a peer's stop) skips the `finally` below: what it made goes the same way.
    leaving = (undone_on_leaving(lambda: remove_if_nothing_written(run_dir)) if created and lock is not None
               else contextlib.nullcontext())
    try:
        with leaving:
            refuse_unshared(run_dir, lock.record if lock is not None else b"")
            yield
        kept = True
    finally:
        if lock is not None:
            lock.release()
            if created and not kept:
                remove_if_nothing_written(run_dir)


def remove_if_nothing_written(run_dir: pathlib.Path) -> None:
    """Remove a run directory a refused start created, where it holds nothing but the lock file, the tokenizer
    copied in (bound to the directory only by a first checkpoint) and empty folders: a mistake named before any
    step leaves no directory behind."""
    removable = {run_dir / LOCK_FILE, *kept_tokenizer_files(run_dir)}
    try:
        if all(path in removable for path in run_dir.rglob("*") if not path.is_dir()):
            shutil.rmtree(run_dir)
    except OSError:  # another process's directory now, or a file system that refuses: it stays
        pass


def refuse_unshared(run_dir: pathlib.Path, record: bytes) -> None:
    """Refuse, on every process, a run directory some process does not see as process 0 does: process 0's lock
    `record` is not in its lock file there. On each host's own disk (`--run-dir /tmp/run` under SLURM or
    Kubernetes), every process writes its part of a checkpoint where process 0 cannot see it, and the first
    save waits for them for ever. A process that does not see the record yet looks again for
    SHARED_PATIENCE_S: an NFS client may keep its view of a directory that long."""
    if jax.process_count() == 1:
        return
    written = bytes_from_process_0(record)
    start, told = time.monotonic(), False
    while not (seen := _lock_record(run_dir) == written) and time.monotonic() - start < SHARED_PATIENCE_S:
        if not told and time.monotonic() - start >= 2:
            log.info("process %d does not see process 0's lock file in %s yet; looking again for up to %.0f s "
                     "(a network file system's view can lag)", jax.process_index(), run_dir, SHARED_PATIENCE_S)
            told = True
        time.sleep(0.5)
    blind = [index for index, sees in enumerate(from_every_process(b"1" if seen else b"")) if not sees]
    if blind:
        them = f"process {blind[0]} does" if len(blind) == 1 else f"processes {listed([str(i) for i in blind], 8)} do"
        raise on_every_process(ConfigError(
            f"--run-dir {str(run_dir)!r} is not shared by the run's processes: {them} not see the lock file process "
            "0 wrote there (a folder on each host's own disk?); a multi-process run needs its run directory on a "
            "file system they all share (NFS, Lustre, a bucket mount), else its first checkpoint never completes"))


def _lock_record(run_dir: pathlib.Path) -> bytes | None:
    try:
        return (run_dir / LOCK_FILE).read_bytes()
    except OSError:
        return None


def starting_point(ckpt: Checkpointer, target, cfg: Config, run_dir: pathlib.Path) -> Restored | None:
    """The verified checkpoint to continue from, or None to start from step 0."""
    if cfg.checkpoint.resume == "never":
        if ckpt.steps():
            refuse_continuing_an_import(ckpt, run_dir)
            raise CheckpointError(
                f"run directory {str(run_dir)!r} already holds checkpoints (steps {ckpt.steps()}) and "
                "checkpoint.resume=never; set checkpoint.resume=auto to continue it, or choose another --run-dir")
        return None
    try:
        return ckpt.restore_newest_intact(target)
    except CheckpointMismatch as err:
        refuse_continuing_an_import(ckpt, run_dir)  # first: an import mismatches by the training state it lacks
        raise CheckpointMismatch(_other_model(run_dir, cfg) or str(err)) from None


def refuse_continuing_an_import(ckpt: Checkpointer, run_dir: pathlib.Path) -> None:
    """A run directory `jaxgen import` wrote holds parameters alone, no training state: continued, its restore
    listed the optimizer's state as missing arrays, as if the checkpoint were damaged. It starts new runs.
    Asked only once a continuation failed, so a resume reads nothing more."""
    steps = ckpt.steps()
    try:
        source = read_step_meta(ckpt.directory, steps[-1]).get("imported_from") if steps else None
    except CheckpointError:  # a damaged newest checkpoint: the restore names it, and reads an older one
        return
    if source is None:
        return
    tokenizer = f" data.tokenizer={shlex.quote(str(run_dir))}" if kept_tokenizer_files(run_dir) else ""
    raise CheckpointError(
        f"run directory {str(run_dir)!r} is an import of {source!r}: parameters alone, with no training state to "
        f"continue; fine-tune them in a new run: jaxgen train --run-dir NEW --config "
        f"{shlex.quote(str(run_dir / 'config.yaml'))} checkpoint.init_from={shlex.quote(str(run_dir))}{tokenizer}"
    ) from None


# Model settings a fine-tune may set otherwise than the parameters it starts from were trained with: how the
# function is computed, and how long a context it is trained on (rotary positions extend).
FINE_TUNE_MAY_CHANGE = (*HOW_COMPUTED, "max_seq_len")


def warn_of_another_function(what: str, source_config: dict, cfg: Config) -> None:
    """Parameters to fine-tune (`checkpoint.init_from`) trained as another function than this run's model
    computes (its rope_theta, norm_eps or rope_scaling: shapes alike, so the restore took them, and the fine-tune
    started from a model other than the one saved) are named in a warning, with the config that keeps theirs."""
    try:
        theirs = Config.model_validate(as_saved_now(source_config)).model
    except ValueError:  # saved by a jaxgen whose settings this one no longer reads: nothing to compare
        return
    ours = cfg.model
    if type(theirs) is not type(ours):
        return
    changes = []
    for name in type(ours).model_fields:
        # A default left unset (head_dim: null) is the value it resolves to.
        was, now = (getattr(model, f"resolved_{name}", getattr(model, name)) for model in (theirs, ours))
        if name not in FINE_TUNE_MAY_CHANGE and was != now:
            changes.append(f"model.{name}: {shown(was)} -> {shown(now)}")
    if changes:
        log.warning("%s: its parameters were trained as another model than this run's config sets (%s), alike in "
                    "shapes: this run starts from a model that computes otherwise; to fine-tune the model saved, give "
                    "its settings (--config with its run's config.yaml)", what, listed(changes, 6))


SHAPING_SECTIONS = ("conditioning.", "diffusion.autoencoder", "autoencoder.adversarial.", "optimizer.")


def _other_model(run_dir: pathlib.Path, cfg: Config) -> str | None:
    """Which model settings of this config differ from those the run was trained with (its newest checkpoint's,
    else its config.yaml's), as one line."""
    try:
        written = load_config(run_dir / "config.yaml")
    except (ConfigError, OSError):
        written = None
    saved = _trained_settings(run_dir) or (written.model_dump(mode="json") if written is not None else None)
    if saved is None:
        return None
    changed = changed_settings(saved, cfg.model_dump(mode="json"))
    # The model's own settings first; else those that shape its other groups and state (a text-to-image run's
    # caption encoder, a frozen autoencoder, a discriminator, the optimizer's state).
    changes = ([change for change in changed if change.startswith("model.")]
               or [change for change in changed if change.startswith(SHAPING_SECTIONS)])
    if not changes:
        return None
    changes = [change for change in changes if change.startswith("model.kind:")] or changes  # then all differ
    if written is not None and written.model == cfg.model and changed_settings(saved, written.model_dump(mode="json")):
        return (f"{str(run_dir / 'config.yaml')!r} holds other settings than the run's checkpoints were trained "
                f"with ({listed(changes, 6)}): it was edited or cut short; put back those settings (under \"config\" "
                "in checkpoints/<step>/meta/metadata), or train in a new --run-dir")
    return (f"run directory {str(run_dir)!r} holds a model trained with other settings ({listed(changes, 6)}); "
            f"continue it with its own (`jaxgen train --run-dir {run_dir}`, without the --config or overrides "
            "that change them) or train this config in a new --run-dir")


def _trained_settings(run_dir: pathlib.Path) -> dict | None:
    """The config (as JSON) the run's newest committed checkpoint was trained with; None where none can be read."""
    steps = committed_steps(checkpoint_dir(run_dir))
    try:
        saved = read_step_meta(checkpoint_dir(run_dir), steps[-1])["config"] if steps else None
    except (CheckpointError, OSError, KeyError, TypeError):
        return None
    return as_saved_now(saved) if isinstance(saved, dict) else None


def forget_unfinished_start(run_dir: pathlib.Path, cfg: Config) -> None:
    """Before a start from step 0: drop the tokenizer a run killed before its first checkpoint left.

    It binds the directory only once a checkpoint was trained with it; until
    then the configured one (or a freshly trained one) is taken. Metrics and
    TensorBoard records of such a run are dropped by MetricsWriter.
    """
    leftover = tokenizer_file_in(run_dir)
    given = cfg.data.tokenizer and pathlib.Path(cfg.data.tokenizer).absolute()
    if jax.process_index() == 0 and leftover is not None and given not in (leftover.absolute(), run_dir.absolute()):
        for path in kept_tokenizer_files(run_dir):
            path.unlink(missing_ok=True)


def refuse_other_tokenizer(what: str, source: dict, current: dict, source_run: pathlib.Path) -> None:
    """Parameters to fine-tune (`checkpoint.init_from`) trained with another tokenizer than this run's are
    refused: each embedding row would stand for another token. `source`/`current`: the checkpoint's and this
    run's recorded inputs; families without a tokenizer record none."""
    theirs, ours = source.get("tokenizer_sha256"), current.get("tokenizer_sha256")
    if theirs and ours and theirs != ours:
        raise CheckpointError(f"{what}: its parameters were trained with tokenizer {source.get('tokenizer_path')} "
                              f"(sha256 {theirs[:12]}...), but this run reads {current.get('tokenizer_path')} "
                              f"(sha256 {ours[:12]}...); give data.tokenizer={str(source_run)!r}, the tokenizer its "
                              "run keeps")


def with_start_kept(cfg: Config, meta: dict, step: int) -> Config:
    """`cfg` with the `checkpoint.init_from` the run started from (recorded in checkpoint `step`'s `meta`): it
    sets where a run starts, and a resumed run goes on from its own checkpoint. Another value was written to
    config.yaml, which then named a source the run never read."""
    saved = meta.get("config", {}).get("checkpoint", {})
    if "init_from" not in saved or saved["init_from"] == cfg.checkpoint.init_from:
        return cfg
    log.warning("checkpoint.init_from=%r is not applied: it sets where a run starts, and this one continues from "
                "its own step %d (config.yaml keeps %r)", cfg.checkpoint.init_from, step, saved["init_from"])
    return cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"init_from": saved["init_from"]})})


def summarizes(run_dir: pathlib.Path, step: int) -> bool:
    """Whether the run's summary.json is that of its end at `step` (one of an earlier end, the run extended
    since, is not)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("steps") == step
    except (OSError, ValueError, AttributeError):
        return False


def refuse_fewer_steps(cfg: Config, step: int, meta: dict) -> None:
    """A run past `train.steps` was asked to end before where it is: said so, rather than called complete."""
    saved = meta.get("config", {}).get("train", {}).get("steps")
    planned = f" (it was saved with train.steps={saved})" if isinstance(saved, int) else ""
    raise ConfigError(f"train.steps={cfg.train.steps} is below step {step}, which the run's newest checkpoint "
                      f"holds{planned}; give train.steps={step} or more to continue it, or another --run-dir to "
                      "train anew")


def refuse_other_objective(cfg: Config, step: int, meta: dict) -> None:
    """A diffusion run continued under another objective: the network's output (noise, v or velocity) would be
    trained to mean another quantity from weights that predict the first, with no shape to tell. Changing it is
    fine-tuning, which starts a new run from the parameters."""
    saved = meta.get("config", {}).get("diffusion", {}).get("objective")
    if cfg.model.kind != "dit" or saved is None or saved == cfg.diffusion.objective:
        return
    raise ConfigError(f"diffusion.objective={cfg.diffusion.objective!r}: the run's step {step} was trained to predict "
                      f"for diffusion.objective={saved!r}, and continuing would train the same output toward another "
                      f"target; give diffusion.objective={saved!r} to continue it, or fine-tune for "
                      f"{cfg.diffusion.objective!r} in a new --run-dir with checkpoint.init_from=RUN_DIR")


def completed_summary(run_dir: pathlib.Path, step: int) -> dict:
    """What a complete run reports when its command runs again: its summary, untouched."""
    log.info("run directory %s is complete (step %d); nothing to do", run_dir, step)
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {"steps": step}
    return {**summary, "complete": True}

"""The training loop: config in, trained state and a run directory out.

Read top to bottom: mesh and plan (refused before anything is allocated if it
cannot fit), run directory (locked), state (resumed from the newest intact
checkpoint, fresh, or found complete), data, compile, loop, wrap-up. The step
is pure and jitted; the loop owns every side effect through its actions
(`jaxgen.train.actions`), run at step boundaries, and waits on the device only
where a value is needed.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import sys
import time

import jax
from tqdm.contrib.logging import logging_redirect_tqdm

from jaxgen import __version__, strict_json
from jaxgen.allocator import loaded_allocator
from jaxgen.checkpoint import Checkpointer, committed_checkpoint, read_step_meta, restore_subtree
from jaxgen.checkpoint_layout import checkpoint_dir
from jaxgen.config import Config, as_saved_now, changed_settings
from jaxgen.data.fingerprint import changed_files, data_files, refuse_other_files_than_process_0
from jaxgen.data.lockstep import next_in_lockstep
from jaxgen.data.pipeline import merged_position, process_streams, this_process, to_global
from jaxgen.device_memory import check_fits
from jaxgen.distributed import bytes_from_process_0, is_multiprocess, stop_together
from jaxgen.errors import (
    EXIT_PREEMPTED,
    ConfigError,
    DataError,
    NonFiniteError,
    OutputWriteError,
    Preempted,
    describe_os_error,
    listed,
)
from jaxgen.evals.benchmark import Benchmarks, load_tasks, make_scorer, require_language_model
from jaxgen.evals.plots import plot_benchmarks
from jaxgen.evals.tasks import Task as BenchmarkTask
from jaxgen.files import write_atomic
from jaxgen.interrupts import after_ctrl_c, again, claim_last_word
from jaxgen.metrics import (
    MetricsWriter,
    StartupClock,
    ThroughputMeter,
    plot_loss_curve,
    process_start_time,
    read_metrics,
    run_peak,
)
from jaxgen.progress import progress_bar
from jaxgen.sharding import data_parallel_size, make_mesh
from jaxgen.tasks import keep_frozen_inputs, make_task, with_frozen_settings
from jaxgen.tasks.layout import MAIN_GROUP
from jaxgen.trackers import open_trackers, require_libraries
from jaxgen.train.actions import Evaluate, EvaluateTasks, Progress, Sample, Save, StepRecords
from jaxgen.train.build import Training, build_training
from jaxgen.train.compilation_cache import cache_events, unwritable_directory, use_compilation_cache
from jaxgen.train.optimizer import warn_of_long_warmup
from jaxgen.train.preemption import PreemptionWatch
from jaxgen.train.run_dir import (
    completed_summary,
    forget_unfinished_start,
    holding,
    refuse_fewer_steps,
    refuse_other_objective,
    refuse_other_tokenizer,
    starting_point,
    summarizes,
    warn_of_another_function,
    with_start_kept,
)
from jaxgen.train.state import sampling_params, with_params

log = logging.getLogger("jaxgen")

def train(cfg: Config, run_dir: str | pathlib.Path, startup: dict[str, float] | None = None) -> dict:
    """Train per `cfg`, writing everything to `run_dir`; returns the run summary.

    `startup`: when the phases before this call ended (`time.time()`: a command's imports and
    config); start-up times then count from the process start, else from this call.
    Raises `Preempted` after saving when SIGTERM/SIGINT asked the run to stop.
    """
    run_dir, wall_start = pathlib.Path(run_dir), time.perf_counter()
    cfg = with_frozen_settings(cfg)  # config.yaml keeps them: the run opens where the runs it froze are gone
    clock = StartupClock((process_start_time() or min(startup.values())) if startup else time.time(), startup)
    # Each on every process, which stop together when one fails (its host's files differ, say).
    cache_dir = stop_together(lambda: use_compilation_cache(cfg.train.compilation_cache_dir))
    cache_events.clear()  # this run's, in a process that trains more than once
    require_libraries(cfg.logging)
    mesh = make_mesh(cfg.mesh)
    dp = data_parallel_size(mesh)
    if cfg.data.batch_size % (dp * cfg.train.microbatches):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by the data-parallel devices "
                          f"(mesh.data x mesh.fsdp = {dp}) times train.microbatches={cfg.train.microbatches}")
    process_streams(cfg.data.reader_streams, this_process())  # refused now, not after a restore
    log.info("mesh %s on %d %s devices", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
    training = build_training(cfg, mesh, make_task(cfg, run_dir))  # abstract: nothing is allocated yet
    check_fits("training this model", training.layout.bytes_per_device())
    eval_tasks = stop_together(lambda: load_eval_tasks(cfg))  # a missing or malformed task file: before any work
    # What the run opens closes however it ends.
    with holding(run_dir, cfg.data.tokenizer), contextlib.ExitStack() as closing:
        ckpt = Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint)
        closing.callback(ckpt.close)  # a refused start too: Orbax's threads must not outlive it
        clock.mark("setup")
        return _train(cfg, run_dir, training, ckpt, closing, wall_start, eval_tasks, clock, cache_dir)


def stopping_together(failure: BaseException | None) -> bool:
    """Whether every process of the run leaves the loop now (or this process runs alone), so that they can wait
    for a started save together (a multi-process save is a collective). A failure only one process may meet
    (its host's disk, its device) leaves the others stepping: waiting for the save there hung every process
    for ever. Stops every process meets at the same step: a signal, the data (`next_in_lockstep`), a
    non-finite loss."""
    if failure is None or not is_multiprocess():
        return True
    return isinstance(failure, (Preempted, DataError, NonFiniteError))


def last_logged(run_dir: pathlib.Path, *keys: str, step: int | None = None) -> dict[str, float]:
    """The last value of each of `keys` in the run's metrics.jsonl (read once), of `step` only where given: what
    a summary written by a later process reports."""
    last: dict[str, float] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if step is None or record.get("step") == step:
            last.update((key, record[key]) for key in keys if key in record)
    return last


def load_eval_tasks(cfg: Config) -> list[BenchmarkTask]:
    if not cfg.train.eval_tasks:
        return []
    require_language_model(cfg)
    return load_tasks(list(cfg.train.eval_tasks), cfg.train.eval_task_data)


# The settings that size the held-out set: a resumed run that changes one is evaluated on another set. An image
# task's rows are images: data.seq_len sizes nothing there.
HELD_OUT_SIZE = ("data.batch_size", "data.seq_len", "train.eval_batches")
HELD_OUT_ROWS = {"tokens": "rows of data.seq_len tokens", "images": "images"}


def _train(cfg: Config, run_dir: pathlib.Path, training: Training, ckpt: Checkpointer,
           closing: contextlib.ExitStack, wall_start: float, eval_tasks: list[BenchmarkTask],
           clock: StartupClock, cache_dir: str | None) -> dict:
    # ------------------------------------------------------------------ state: resumed, complete or fresh
    task, layout, mesh = training.task, training.layout, training.mesh
    resumed = starting_point(ckpt, layout.target, cfg, run_dir)
    if resumed is not None:
        cfg = with_start_kept(cfg, resumed.meta, resumed.step)
    if resumed is not None and resumed.step > cfg.train.steps:
        refuse_fewer_steps(cfg, resumed.step, resumed.meta)
    if resumed is not None:
        refuse_other_objective(cfg, resumed.step, resumed.meta)
    wrap_up_only = resumed is not None and resumed.step >= cfg.train.steps
    if not wrap_up_only:  # after the refusal of fewer steps, which the warning would only precede as noise
        warn_of_long_warmup(cfg.optimizer, cfg.train.steps)
    # Process 0's view, on every process: all of them return here, or all go on to the wrap-up's collectives. A
    # summary.json of an earlier end (the run was extended since) is not this step's: the wrap-up writes it.
    if wrap_up_only and bytes_from_process_0(b"1" if summarizes(run_dir, resumed.step) else b"") == b"1":
        return completed_summary(run_dir, resumed.step)
    if wrap_up_only:  # stopped after its final checkpoint, before its end: what it had left to write is written
        log.info("run directory %s saved its final step (%d) but was stopped before its end-of-run outputs "
                 "(summary.json, final samples, plots): writing them", run_dir, resumed.step)
    if resumed is None:
        forget_unfinished_start(run_dir, cfg)
    init_from = f"checkpoint.init_from={cfg.checkpoint.init_from!r}"
    # A source that is not there is named before the data is read; its tokenizer is compared once ours is made.
    source = stop_together(lambda: committed_checkpoint(cfg.checkpoint.init_from, None, init_from)) \
        if resumed is None and cfg.checkpoint.init_from else None
    clock.mark("checkpoint")

    # ------------------------------------------------------------------ data
    files = data_files(cfg)
    refuse_other_files_than_process_0(files)
    data = task.make_data(run_dir)
    eval_set = [to_global(batch, mesh) for batch in data.eval]
    meta = {"config": cfg.model_dump(mode="json"), "inputs": task.inputs(data), "data_files": files,
            "process_count": jax.process_count(), "jaxgen_version": __version__}
    clock.mark("data")
    if resumed is not None:
        task.check_inputs(resumed.meta.get("inputs", {}), meta["inputs"])
        saved_steps = resumed.meta.get("config", {}).get("train", {}).get("steps")
        if isinstance(saved_steps, int) and saved_steps > cfg.train.steps > resumed.step:  # larger: extended
            log.warning("continuing step %d with train.steps lowered (%d -> %d): the learning rate now follows the "
                        "schedule of a %d-step run", resumed.step, saved_steps, cfg.train.steps, cfg.train.steps)
        saved_config = as_saved_now(resumed.meta["config"]) if "config" in resumed.meta else None
        if saved_config is not None and (changes := changed_settings(saved_config, meta["config"])):
            log.warning("continuing step %d with settings changed since it was saved (config.yaml takes the new "
                        "ones as training starts): %s", resumed.step, listed(changes, 8))
            sizing = [k for k in HELD_OUT_SIZE if task.unit == "tokens" or k != "data.seq_len"]
            if held_out := [c.split(":")[0] for c in changes if c.split(":")[0] in sizing]:
                log.warning("%s changed: the held-out set is train.eval_batches batches of data.batch_size %s, so "
                            "eval_loss from step %d on is measured on another set than before", " and ".join(held_out),
                            HELD_OUT_ROWS[task.unit], resumed.step)
        if "data_files" in resumed.meta and (changes := changed_files(resumed.meta["data_files"], meta["data_files"])):
            log.warning("continuing step %d on training files changed since it was saved (%s): the run goes on, but "
                        "no longer in the data order nor with the held-out set it had", resumed.step, listed(changes, 4))
        state = resumed.state
        data.train.set_state(merged_position(resumed.data_states))  # saved on any process count
        log.info("resumed from %s at step %d", ckpt.directory, resumed.step)
    else:
        state = training.init_state()
        if source is not None:
            source_meta = stop_together(lambda: read_step_meta(*source))
            stop_together(lambda: refuse_other_tokenizer(init_from, source_meta.get("inputs", {}), meta["inputs"],
                                                         source[0].parent))
            params, _, _ = restore_subtree(source[0], ("params",), layout.models.target, source[1], what=init_from)
            state = with_params(state, params)
            warn_of_another_function(init_from, source_meta.get("config", {}), cfg)
    clock.mark("state")

    # ------------------------------------------------------------------ logs: a tracker that cannot start (no
    # W&B key, an MLflow URI of no store) is named before the run's config is written and before the compile
    progress = Progress(state=state, last_saved=resumed.step if resumed is not None else None)
    trackers = open_trackers(cfg, run_dir, resumed_at=progress.last_saved)  # first: it reads what the writer drops
    writer = closing.enter_context(MetricsWriter(run_dir, cfg.logging.tensorboard, progress.last_saved, trackers))
    start_step = int(state.step)
    n_params = sum(int(x.size) for x in jax.tree.leaves(layout.abstract.params))
    log.info("model: %s parameters", f"{n_params:,}")
    clock.mark("logs")

    # ------------------------------------------------------------------ compile
    compile_start = time.perf_counter()
    if not wrap_up_only:
        batch = to_global(next_in_lockstep(data.train, start_step + 1), mesh)
        train_step = training.train_step.lower(state, batch).compile()
        log.info("compiled in %.1fs", time.perf_counter() - compile_start)
    compile_s = time.perf_counter() - compile_start
    # Only once the state fits and the step compiles: a refused resume changes nothing, and a refused start (a
    # sharding the model's shapes do not split over, found by the compile) leaves no config a rerun would read.
    if jax.process_index() == 0:
        write_atomic(run_dir / "config.yaml", cfg.to_yaml())
        if resumed is None:
            keep_frozen_inputs(task, run_dir)
    clock.mark("compile")

    # ------------------------------------------------------------------ actions
    peak = run_peak(cfg.train.peak_flops_per_device, cfg.model.compute_dtype, mesh.size)  # measured when first read
    meter = ThroughputMeter(task.units_per_batch(), task.flops_per_unit(), peak, start_step)
    bar = progress_bar(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=0.5,
                       disable=not (jax.process_index() == 0 and cfg.logging.progress_bar))
    records = StepRecords(cfg, task, writer, meter, bar, progress)
    evaluate = Evaluate(cfg, training, eval_set, writer, meter, bar, progress)
    save = Save(cfg, ckpt, meta, writer, progress)
    actions = [evaluate, Sample(task, training, data, run_dir, writer, meter, progress), save]
    if eval_tasks:
        models = layout.models
        scorer = make_scorer(cfg, mesh, models.graphdefs[MAIN_GROUP], models.shardings[MAIN_GROUP],
                             cfg.data.batch_size)
        actions.insert(1, EvaluateTasks(cfg, Benchmarks(eval_tasks, data.tokenizer, scorer), run_dir, writer, meter,
                                        progress))
    clock.mark("actions")

    # ------------------------------------------------------------------ loop
    preemption = PreemptionWatch()
    try:
        if start_step == 0:
            evaluate.run(0)
        clock.mark("eval")
        with logging_redirect_tqdm():
            for step in range(start_step + 1, cfg.train.steps + 1):
                final = step == cfg.train.steps
                progress.state, metrics = train_step(progress.state, batch)
                if step == start_step + 1:  # once: how long a user waits for the first step
                    jax.block_until_ready(metrics)
                    clock.mark("first_step")
                    log.info("first step done %.1fs after start", clock.phases()["total"])
                    meter.idle()  # the first peak measurement, while nothing else runs
                progress.data_state = data.train.get_state()
                records.observe(step, metrics)  # before the next batch, which may fail: the step is then saved
                if not final:
                    batch = to_global(next_in_lockstep(data.train, step + 1), mesh)  # overlaps the device step
                stop = preemption.reached(step)
                due = [action for action in actions if action.cadence.due(step, final) or (stop and action is save)]
                if due or stop:
                    records.settle(stopping=stop)  # nothing is evaluated or saved past an unchecked step
                    meter.idle()
                for action in due:
                    action.run(step)
                if stop:
                    raise Preempted(step, again())
    except OSError as err:  # a file written besides checkpoints (records, samples): the steps are saved first
        if save.saving:
            raise
        raise save.after_os_error(err, records) from err
    except DataError as err:  # a batch that cannot be read: where processes stop together, as they were
        if save.saving or is_multiprocess():
            raise
        raise save.after_data_error(err, records) from err
    finally:
        with contextlib.suppress(OSError):  # a log whose reader has gone must not replace the failure stopped on
            bar.close()  # ends the bar's line, so whatever is printed next starts on its own
        preemption.close()
        writer.flush()
        failure = sys.exc_info()[1]
        if failure is not None and is_multiprocess():  # it ends with its own line: a peer's posted stop
            claim_last_word()  # (jaxgen.peer_stops) must not cut its wait for a save short
        if stopping_together(failure):
            ckpt.wait()  # a started save always completes: it is a good checkpoint

    # ------------------------------------------------------------------ wrap-up
    after_ctrl_c(EXIT_PREEMPTED, f"interrupted after the final checkpoint (step {progress.last_saved}) was saved, "
                                 f"before the end-of-run outputs (summary.json, final samples, plots); {again()} to "
                                 "write them")
    peak.refresh(every_s=60)  # the device is idle: a last chance at a better peak, unless one is a minute old
    rates = meter.median()
    logged = last_logged(run_dir, "loss", "eval_loss") if wrap_up_only else {}  # no step of this process logged
    summary = {
        "steps": cfg.train.steps, "resumed_from": resumed.step if resumed is not None else None,
        "params": n_params, "devices": mesh.size, "mesh": dict(mesh.shape),
        "final_loss": records.last.get("loss", logged.get("loss")),
        # A resumed run's process did not evaluate step 0: the one that did logged it.
        "eval_loss_initial": (evaluate.history[0] if evaluate.history and start_step == 0
                              else last_logged(run_dir, "eval_loss", step=0).get("eval_loss")),
        "eval_loss_final": evaluate.history[-1] if evaluate.history else logged.get("eval_loss"),
        "nonfinite_steps": int(progress.state.nonfinite_steps),
        f"{task.unit}_per_s_median": rates["units_per_s"], "mfu_median": rates["mfu"],
        "peak_flops": peak.flops, "peak_source": peak.source, **({"mfu_note": peak.note} if peak.note else {}),
        "allocator": loaded_allocator(), "compile_s": compile_s, "startup_s": clock.phases(),
    }
    if cache_dir is not None:  # what this process's compilations found in, and wrote to, the persistent cache
        kept = unwritable_directory(pathlib.Path(cache_dir)) is None  # JAX counts a write it could not make too
        summary["compilation_cache"] = {"dir": cache_dir, "hits": cache_events["hits"],
                                        "writes": cache_events["writes"] - cache_events["failed"] if kept else 0}
    try:
        # Every process takes part in sampling from sharded params; the task writes files on process 0 only.
        samples = task.sample(layout.models.weights(sampling_params(progress.state)), data, run_dir, step=None)
        summary["wall_s"] = time.perf_counter() - wall_start
        if jax.process_index() == 0:
            summary.update(samples)
            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", task.loss_name)
            if eval_tasks:
                plot_benchmarks(run_dir)
            writer.log_pictures(cfg.train.steps, {**samples, "loss_curve": str(run_dir / "loss_curve.png")})
            write_atomic(run_dir / "summary.json", strict_json.dumps(summary, indent=2) + "\n")
    except OSError as err:  # a full disk at the very end: every step is saved, only these outputs are missing
        raise OutputWriteError(f"{describe_os_error(err)}; the final checkpoint (step {progress.last_saved}) is "
                               f"saved, so no step is lost; {again()} to write the end-of-run outputs (summary.json, "
                               "final samples, plots) once it is mended") from err
    return summary

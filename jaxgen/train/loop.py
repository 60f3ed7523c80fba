"""The training loop: config in, trained state and a run directory out.

Read top to bottom: mesh, run directory (locked), state (resumed from the
newest intact checkpoint, fresh, or found complete), data, compile, loop,
wrap-up. The step is pure and jitted; the loop owns every side effect and only
waits on the device where a value is needed (the metrics of step N are fetched
after step N+1 has been dispatched, every step, so a skipped step is seen
before anything is saved; evaluation needs the params; a checkpoint copies the
state off the devices).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jaxgen import __version__
from jaxgen.checkpoint import Checkpointer, checkpoint_dir, restore_subtree
from jaxgen.config import Config
from jaxgen.data.pipeline import to_global
from jaxgen.device_memory import check_fits
from jaxgen.distributed import next_in_lockstep
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.files import write_atomic
from jaxgen.interrupts import after_ctrl_c
from jaxgen.metrics import MetricsWriter, peak_flops_per_device, plot_loss_curve
from jaxgen.sharding import data_parallel_size, make_mesh
from jaxgen.train.build import Training, build_training
from jaxgen.train.nonfinite import NonFiniteWatch
from jaxgen.train.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatch
from jaxgen.train.run_dir import completed_summary, forget_unfinished_start, holding, starting_point
from jaxgen.train.step import held_out_sums
from jaxgen.train.tasks import make_task

log = logging.getLogger("jaxgen")


def sampling_params(state) -> dict:
    """What evaluation and samples use: the parameter average when the task keeps one."""
    return state.ema_params if state.ema_params is not None else state.params


def run_metadata(cfg: Config, data) -> dict:
    tokenizer = getattr(data, "tokenizer", None)
    return {
        "config": cfg.model_dump(mode="json"),
        "tokenizer_sha256": tokenizer.sha256 if tokenizer else None,
        "tokenizer_path": str(tokenizer.path) if tokenizer else None,
        "process_count": jax.process_count(),
        "jaxgen_version": __version__,
    }


def check_same_tokenizer(saved: dict, current: dict) -> None:
    if saved.get("tokenizer_sha256") != current.get("tokenizer_sha256"):
        raise CheckpointError(
            f"the checkpoint was trained with tokenizer {saved.get('tokenizer_path')} "
            f"(sha256 {saved.get('tokenizer_sha256')}), but this run uses {current.get('tokenizer_path')} "
            f"(sha256 {current.get('tokenizer_sha256')}); resume with the checkpoint's tokenizer"
        )


def train(cfg: Config, run_dir: str | pathlib.Path) -> dict:
    """Train per `cfg`, writing everything to `run_dir`; returns the run summary.

    Raises `Preempted` after saving when SIGTERM/SIGINT asked the run to stop.
    """
    run_dir = pathlib.Path(run_dir)
    wall_start = time.perf_counter()

    # ------------------------------------------------------------------ mesh
    mesh = make_mesh(cfg.mesh)
    dp = data_parallel_size(mesh)
    if cfg.data.batch_size % (dp * cfg.train.microbatches):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by the data-parallel devices "
            f"(mesh.data x mesh.fsdp = {dp}) times train.microbatches={cfg.train.microbatches}"
        )
    log.info("mesh %s on %d %s devices", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
    task = make_task(cfg)
    training = build_training(cfg, mesh, task)  # abstract: nothing is allocated yet
    check_fits("training this model", training.layout.bytes_per_device())

    # ------------------------------------------------------------------ run directory: one writer
    with holding(run_dir):
        ckpt = Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint)
        try:
            return _train_holding(cfg, run_dir, training, ckpt, wall_start)
        finally:
            ckpt.close()  # a refused start too: Orbax's threads must not outlive it


def _train_holding(cfg: Config, run_dir: pathlib.Path, training: Training, ckpt: Checkpointer,
                   wall_start: float) -> dict:
    # ------------------------------------------------------------------ state: resumed or fresh
    mesh, task, layout = training.mesh, training.task, training.layout
    resumed = starting_point(ckpt, layout.target, cfg, run_dir)
    if resumed is not None and resumed.step >= cfg.train.steps:
        return completed_summary(run_dir, resumed.step)
    if resumed is None:
        forget_unfinished_start(run_dir, cfg)

    # ------------------------------------------------------------------ data
    data = task.make_data(run_dir)
    eval_set = [to_global(batch, mesh) for batch in data.eval]
    meta = run_metadata(cfg, data)
    if resumed is not None:
        check_same_tokenizer(resumed.meta, meta)
        state = resumed.state
        data.train.set_state(resumed.data_state)
        log.info("resumed from %s at step %d", ckpt.directory, resumed.step)
    else:
        state = training.init_state()
        if cfg.checkpoint.init_from:
            params, _, _ = restore_subtree(cfg.checkpoint.init_from, ("params",), layout.target.params,
                                           what=f"checkpoint.init_from={cfg.checkpoint.init_from!r}")
            state = state.replace(params=params)
    if jax.process_index() == 0:  # only once the state is known to fit: a refused resume changes nothing
        write_atomic(run_dir / "config.yaml", cfg.to_yaml())
    start_step = int(state.step)
    resume_step = resumed.step if resumed is not None else None
    last_saved = resume_step
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layout.abstract.params))
    log.info("model: %s parameters", f"{n_params:,}")

    # ------------------------------------------------------------------ compile
    compile_start = time.perf_counter()
    batch = to_global(next_in_lockstep(data.train, start_step + 1), mesh)
    train_step = training.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - compile_start

    units_per_step = task.units_per_batch()
    peak, peak_source = peak_flops_per_device(cfg.train.peak_flops_per_device, cfg.model.compute_dtype)
    # Simulated CPU devices share one host's cores: the host peak is the whole budget.
    total_peak = peak if jax.devices()[0].platform == "cpu" else peak * mesh.size
    log.info("compiled in %.1fs; MFU against %.3g FLOP/s (%s)", compile_s, total_peak, peak_source)

    writer = MetricsWriter(run_dir, cfg.logging.tensorboard, resumed_at=resume_step)

    def evaluate(step: int) -> float:
        loss_sum, weight = held_out_sums(training.eval_step, sampling_params(state), eval_set)
        eval_loss = loss_sum / max(weight, 1.0)
        writer.write(step, {"eval_loss": eval_loss})
        return eval_loss

    # ------------------------------------------------------------------ loop
    is_main = jax.process_index() == 0
    bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=0.5,
               disable=not (is_main and cfg.logging.progress_bar))
    clock = {"time": time.perf_counter(), "step": start_step}
    throughput: list[float] = []
    last: dict = {}
    nonfinite = NonFiniteWatch(cfg.train)

    def check(step: int, metrics, stopping: bool = False) -> None:
        """Step `step`'s metrics, fetched one step late: skipped-step handling, then the log record."""
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        skipped, stop_error = nonfinite.check(step, int(host.pop("nonfinite_cause")), last_saved)
        if stop_error is not None:
            writer.write(step, {**host, "skipped": 1.0})
            raise stop_error
        if not (skipped or stopping or step % cfg.logging.every == 0 or step == cfg.train.steps):
            return
        now = time.perf_counter()
        units_per_s = (step - clock["step"]) * units_per_step / max(now - clock["time"], 1e-9)
        clock.update(time=now, step=step)
        host[f"{task.unit}_per_s"] = units_per_s
        host["mfu"] = units_per_s * task.flops_per_unit() / total_peak
        throughput.append(units_per_s)
        writer.write(step, {**host, **({"skipped": 1.0} if skipped else {})})
        last.update(host)
        bar.set_postfix(loss=f"{host['loss']:.3f}", **{f"{task.unit}/s": f"{units_per_s:,.0f}"})

    sample_every = getattr(task, "sample_every", 0)  # tasks that show progress pictures while training
    preemption = PreemptionWatch()
    eval_history = [evaluate(0)] if start_step == 0 else []
    clock["time"] = time.perf_counter()
    pending = None
    try:
        with logging_redirect_tqdm():
            for step in range(start_step + 1, cfg.train.steps + 1):
                final = step == cfg.train.steps
                state, metrics = train_step(state, batch)
                data_state = data.train.get_state()  # position after exactly `step` batches
                if not final:
                    batch = to_global(next_in_lockstep(data.train, step + 1), mesh)  # overlaps the device step
                if pending:
                    check(*pending)
                pending = (step, metrics)
                bar.update()
                stop = preemption.reached(step)
                save = stop or ckpt.due(step, final)
                evaluating = step % cfg.train.eval_every == 0 or final
                if evaluating or save:
                    check(*pending, stopping=stop)  # nothing is evaluated or saved past an unchecked step
                    pending = None
                if evaluating:
                    eval_history.append(evaluate(step))
                    bar.set_postfix(eval_loss=f"{eval_history[-1]:.3f}")
                    clock.update(time=time.perf_counter(), step=step)
                if sample_every and step % sample_every == 0 and not final:  # every process computes
                    task.sample(layout.graphdef, sampling_params(state), data, run_dir, step=step)
                    clock.update(time=time.perf_counter(), step=step)
                if save:
                    writer.flush()  # the records up to a checkpoint survive whatever kills the run after it
                    ckpt.save(step, state, data_state, meta)
                    last_saved = step
                if stop:
                    raise Preempted(step)
    finally:
        bar.close()  # ends the bar's line, so whatever is printed next starts on its own
        preemption.close()
        writer.flush()
        ckpt.wait()  # a started save always completes: it is a good checkpoint
        writer.close()

    # ------------------------------------------------------------------ wrap-up
    after_ctrl_c(EXIT_PREEMPTED, f"interrupted after the final checkpoint (step {last_saved}) was saved; "
                                 "only summary.json was not written")
    summary = {
        "steps": cfg.train.steps,
        "resumed_from": resume_step,
        "params": n_params,
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "final_loss": last.get("loss"),
        "eval_loss_initial": eval_history[0] if eval_history and start_step == 0 else None,
        "eval_loss_final": eval_history[-1] if eval_history else None,
        "nonfinite_steps": int(state.nonfinite_steps),
        f"{task.unit}_per_s_median": float(np.median(throughput)) if throughput else None,
        "mfu_median": float(np.median(throughput)) * task.flops_per_unit() / total_peak if throughput else None,
        "compile_s": compile_s,
    }
    # Every process takes part in sampling from sharded params; the task writes files on process 0 only.
    samples = task.sample(layout.graphdef, sampling_params(state), data, run_dir)
    if is_main:
        summary.update(samples)
    summary["wall_s"] = time.perf_counter() - wall_start
    if is_main:
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", task.loss_name)
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary

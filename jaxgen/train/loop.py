"""The training loop: config in, trained state and a run directory out.

Read top to bottom: mesh, run directory, data, state (fresh or resumed),
compile, loop, wrap-up. The step is pure and jitted; the loop owns every side
effect and only waits on the device where a value is needed (metrics of step
N are fetched after step N+1 has been dispatched; evaluation needs the params;
a checkpoint copies the state off the devices).
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
from jaxgen.checkpoint import Checkpointer, checkpoint_dir, restore_params
from jaxgen.config import Config
from jaxgen.data.pipeline import to_global
from jaxgen.distributed import next_in_lockstep
from jaxgen.errors import CheckpointError, ConfigError, NonFiniteError
from jaxgen.metrics import MetricsWriter, peak_flops_per_device, plot_loss_curve
from jaxgen.sharding import data_parallel_size, make_mesh
from jaxgen.train.build import build_training
from jaxgen.train.preemption import Preempted, PreemptionWatch
from jaxgen.train.step import held_out_sums
from jaxgen.train.tasks import make_task

log = logging.getLogger("jaxgen")


def sampling_params(state) -> dict:
    """What evaluation and samples use: the parameter average when the task keeps one."""
    return state.ema_params if state.ema_params is not None else state.params


def prepare_run_dir(run_dir: pathlib.Path, cfg: Config, resume_step: int | None) -> None:
    if resume_step is None and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"run directory {str(run_dir)!r} already holds a run with no checkpoint to resume from "
            f"(checkpoint.resume={cfg.checkpoint.resume}); choose another --run-dir"
        )
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)


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

    # ------------------------------------------------------------------ run directory
    ckpt = Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint)
    resume_step = ckpt.latest_step() if cfg.checkpoint.resume == "auto" else None
    prepare_run_dir(run_dir, cfg, resume_step)
    log.info("mesh %s on %d %s devices", dict(mesh.shape), mesh.size, jax.devices()[0].platform)

    # ------------------------------------------------------------------ data
    task = make_task(cfg)
    data = task.make_data(run_dir)
    eval_set = [to_global(batch, mesh) for batch in data.eval]
    meta = run_metadata(cfg, data)

    # ------------------------------------------------------------------ state: resumed, fine-tuned or fresh
    training = build_training(cfg, mesh, task)
    layout = training.layout
    if resume_step is not None:
        state, data_state, saved_meta = ckpt.restore(layout, resume_step)
        check_same_tokenizer(saved_meta, meta)
        data.train.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, resume_step)
    else:
        state = training.init_state()
        if cfg.checkpoint.init_from:
            state = state.replace(params=restore_params(cfg.checkpoint.init_from, layout))
    if jax.process_index() == 0:  # only once the state is known to fit: a refused resume changes nothing
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    start_step = int(state.step)
    nonfinite_at_start = int(state.nonfinite_steps)
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

    writer = MetricsWriter(run_dir, cfg.logging.tensorboard, resume_step=start_step if resume_step else None)

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

    def record(step: int, metrics) -> None:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if cfg.train.nonfinite == "abort" and host["nonfinite_steps"] > nonfinite_at_start:
            raise NonFiniteError(f"non-finite loss or gradient by step {step} (train.nonfinite=abort)")
        now = time.perf_counter()
        units_per_s = (step - clock["step"]) * units_per_step / max(now - clock["time"], 1e-9)
        clock.update(time=now, step=step)
        host[f"{task.unit}_per_s"] = units_per_s
        host["mfu"] = units_per_s * task.flops_per_unit() / total_peak
        throughput.append(units_per_s)
        writer.write(step, host)
        last.update(host)
        bar.set_postfix(loss=f"{host['loss']:.3f}", **{f"{task.unit}/s": f"{units_per_s:,.0f}"})

    def save(step: int, data_state: dict) -> None:
        if cfg.train.nonfinite == "abort" and int(state.nonfinite_steps) > nonfinite_at_start:
            raise NonFiniteError(f"non-finite loss or gradient by step {step}; the last checkpoint is kept")
        ckpt.save(step, state, data_state, meta)

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
                    record(*pending)
                    pending = None
                if step % cfg.logging.every == 0 or final:
                    pending = (step, metrics)
                bar.update()
                if step % cfg.train.eval_every == 0 or final:
                    if pending:
                        record(*pending)
                        pending = None
                    eval_history.append(evaluate(step))
                    bar.set_postfix(eval_loss=f"{eval_history[-1]:.3f}")
                    clock.update(time=time.perf_counter(), step=step)
                if sample_every and step % sample_every == 0 and not final:  # every process computes
                    task.sample(layout.graphdef, sampling_params(state), data, run_dir, step=step)
                    clock.update(time=time.perf_counter(), step=step)
                stop = preemption.reached(step)
                if stop or ckpt.due(step, final):
                    save(step, data_state)
                if stop:
                    raise Preempted(step)
            if pending:
                record(*pending)
        bar.close()
    finally:
        preemption.close()
        ckpt.wait()  # a started save always completes: it is a good checkpoint
        ckpt.close()
        writer.close()

    # ------------------------------------------------------------------ wrap-up
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
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

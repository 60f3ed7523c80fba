"""The training loop: config in, trained state and a run directory out.

Read top to bottom: run directory, mesh, data, state, compile, loop, wrap-up.
The step is pure and jitted; the loop owns every side effect and only waits on
the device where a value is needed (metrics of step N are fetched after step
N+1 has been dispatched; evaluation needs the params).
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

from jaxgen.config import Config, ConfigError
from jaxgen.data.pipeline import to_global
from jaxgen.metrics import MetricsWriter, peak_flops_per_device, plot_loss_curve
from jaxgen.sharding import data_parallel_size, make_mesh
from jaxgen.train.build import build_training
from jaxgen.train.tasks import make_task

log = logging.getLogger("jaxgen")


def prepare_run_dir(run_dir: pathlib.Path, cfg: Config) -> None:
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"run directory {str(run_dir)!r} already holds a run (metrics.jsonl); choose another --run-dir"
        )
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())


def train(cfg: Config, run_dir: str | pathlib.Path) -> dict:
    """Train per `cfg`, writing everything to `run_dir`; returns the run summary."""
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
    prepare_run_dir(run_dir, cfg)
    log.info("mesh %s on %d %s devices", dict(mesh.shape), mesh.size, jax.devices()[0].platform)

    # ------------------------------------------------------------------ data
    task = make_task(cfg)
    data = task.make_data(run_dir)
    eval_set = [to_global(batch, mesh) for batch in data.eval]

    # ------------------------------------------------------------------ model & state
    training = build_training(cfg, mesh, task)
    layout = training.layout
    state = training.init_state()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layout.abstract.params))
    log.info("model: %s parameters", f"{n_params:,}")

    # ------------------------------------------------------------------ compile
    compile_start = time.perf_counter()
    first_batch = to_global(next(data.train), mesh)
    train_step = training.train_step.lower(state, first_batch).compile()
    eval_step = training.eval_step
    compile_s = time.perf_counter() - compile_start

    units_per_step = task.units_per_batch()
    peak, peak_source = peak_flops_per_device(cfg.train.peak_flops_per_device)
    # Simulated CPU devices share one host's cores: the host peak is the whole budget.
    total_peak = peak if jax.devices()[0].platform == "cpu" else peak * mesh.size
    log.info("compiled in %.1fs; MFU against %.3g FLOP/s (%s)", compile_s, total_peak, peak_source)

    writer = MetricsWriter(run_dir, cfg.logging.tensorboard)

    def evaluate(step: int) -> float:
        sums = [eval_step(state.params, batch) for batch in eval_set]
        loss_sum, weight = (float(sum(x)) for x in zip(*jax.device_get(sums)))
        eval_loss = loss_sum / max(weight, 1.0)
        writer.write(step, {"eval_loss": eval_loss})
        return eval_loss

    # ------------------------------------------------------------------ loop
    is_main = jax.process_index() == 0
    bar = tqdm(total=cfg.train.steps, unit="step", disable=not (is_main and cfg.logging.progress_bar),
               dynamic_ncols=True, mininterval=0.5)
    clock = {"time": time.perf_counter(), "step": 0}
    throughput: list[float] = []

    def record(step: int, metrics) -> dict:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        units_per_s = (step - clock["step"]) * units_per_step / max(now - clock["time"], 1e-9)
        clock.update(time=now, step=step)
        host[f"{task.unit}_per_s"] = units_per_s
        host["mfu"] = units_per_s * task.flops_per_unit() / total_peak
        throughput.append(units_per_s)
        writer.write(step, host)
        bar.set_postfix(loss=f"{host['loss']:.3f}", **{f"{task.unit}/s": f"{units_per_s:,.0f}"})
        return host

    with logging_redirect_tqdm():
        eval_history = [evaluate(0)]
        clock["time"] = time.perf_counter()
        last = None
        pending = None
        batch = first_batch
        for step in range(1, cfg.train.steps + 1):
            state, metrics = train_step(state, batch)
            if step < cfg.train.steps:
                batch = to_global(next(data.train), mesh)  # host work overlaps the device step
            if pending:
                last = record(*pending)
                pending = None
            if step % cfg.logging.every == 0 or step == cfg.train.steps:
                pending = (step, metrics)
            bar.update()
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                if pending:
                    last = record(*pending)
                    pending = None
                eval_history.append(evaluate(step))
                bar.set_postfix(eval_loss=f"{eval_history[-1]:.3f}")
                clock.update(time=time.perf_counter(), step=step)
        bar.close()

    # ------------------------------------------------------------------ wrap-up
    writer.close()
    summary = {
        "steps": cfg.train.steps,
        "params": n_params,
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "final_loss": last["loss"],
        "eval_loss_initial": eval_history[0],
        "eval_loss_final": eval_history[-1],
        f"{task.unit}_per_s_median": float(np.median(throughput)),
        "mfu_median": float(np.median(throughput)) * task.flops_per_unit() / total_peak,
        "compile_s": compile_s,
    }
    if is_main:
        summary.update(task.sample(layout.graphdef, state.params, data, run_dir))
    summary["wall_s"] = time.perf_counter() - wall_start
    if is_main:
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

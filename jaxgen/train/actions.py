"""What the training loop does besides stepping: record, evaluate (held-out loss, benchmark tasks), sample and save.

Every action has a `Cadence` (every N steps and/or every M minutes, and at the
last step or not) and runs when the loop asks it at a step boundary. A step's
metrics are fetched one step late, after the next step is dispatched, so the
host never waits on the device for them; anything that evaluates, saves or
stops first settles them, so nothing runs past an unchecked step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxgen.checkpoint import Checkpointer
from jaxgen.config import Config
from jaxgen.errors import (
    DataError,
    JaxgenError,
    NonFiniteError,
    OutputWriteError,
    describe_os_error,
    first_line,
)
from jaxgen.evals.benchmark import Benchmarks, metric_values, result_record, write_result
from jaxgen.interrupts import again
from jaxgen.metrics import MetricsWriter, ThroughputMeter
from jaxgen.tasks import Task, TaskData
from jaxgen.tasks.layout import MAIN_GROUP, held_out_sums
from jaxgen.train.nonfinite import NonFiniteWatch
from jaxgen.train.state import TrainState, sampling_params

log = logging.getLogger("jaxgen")


class Cadence:
    """Due every `steps` steps and/or every `minutes` minutes (process 0's clock), and at the last step if `at_end`."""

    def __init__(self, steps: int | None, minutes: float | None = None, at_end: bool = True):
        self.steps, self.minutes, self.at_end = steps, minutes, at_end
        self._since = time.monotonic()

    def due(self, step: int, final: bool) -> bool:
        if (final and self.at_end) or (self.steps and step % self.steps == 0):
            return True
        if not self.minutes:
            return False
        elapsed = time.monotonic() - self._since >= 60 * self.minutes
        if jax.process_count() > 1:  # every process must give the same answer
            elapsed = bool(multihost_utils.broadcast_one_to_all(np.asarray(elapsed)))
        return elapsed

    def ran(self) -> None:
        self._since = time.monotonic()


@dataclasses.dataclass
class Progress:
    """What the loop knows between steps; the actions read it."""

    state: TrainState
    data_state: dict | None = None  # the data position after exactly `state.step` batches
    last_saved: int | None = None  # the newest checkpoint of this run, if any


class StepRecords:
    """Every step's metrics, fetched one step late and checked for skipped steps; a record on the logging cadence."""

    def __init__(self, cfg: Config, task: Task, writer: MetricsWriter, meter: ThroughputMeter, bar: tqdm,
                 progress: Progress):
        self.cfg, self.unit, self.writer, self.meter, self.bar, self.progress = cfg, task.unit, writer, meter, bar, progress
        self.cadence = Cadence(cfg.logging.every)
        self.nonfinite = NonFiniteWatch(cfg.train)
        self.pending: tuple[int, dict] | None = None
        self.last: dict = {}

    def observe(self, step: int, metrics: dict) -> None:
        """Take step `step`'s metrics (still on the device); settle the previous step's."""
        previous, self.pending = self.pending, (step, metrics)  # pending first: a failed record leaves it to check
        self._settle(previous)
        self.bar.update()

    def settle(self, stopping: bool = False) -> None:
        """Fetch and check the pending step now; a stopping step is always recorded."""
        pending, self.pending = self.pending, None
        self._settle(pending, stopping)

    def settle_after_failure(self) -> NonFiniteError | None:
        """Check the pending step, and record it if the logs still take it (a write just failed): the stop the step
        calls for, if any. Its check comes before its record, so a write that fails again leaves it checked."""
        try:
            self.settle(stopping=True)
        except NonFiniteError as stop:
            return stop
        except OSError:
            pass
        return None

    def _settle(self, pending: tuple[int, dict] | None, stopping: bool = False) -> None:
        if pending is None:
            return
        step, metrics = pending
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        skipped, stop_error = self.nonfinite.check(step, int(host.pop("nonfinite_cause")), self.progress.last_saved)
        if stop_error is not None:
            with contextlib.suppress(OSError):  # the run stops on the non-finite step, recorded or not
                self.writer.write(step, {**host, "skipped": 1.0})
            raise stop_error
        if not (skipped or stopping or self.cadence.due(step, step == self.cfg.train.steps)):
            return
        rates = self.meter.read(step)
        host.update({f"{self.unit}_per_s": rates["units_per_s"], "mfu": rates["mfu"]})
        self.writer.write(step, {**host, **({"skipped": 1.0} if skipped else {})})
        self.last = host
        self.bar.set_postfix(loss=f"{host['loss']:.3f}", **{f"{self.unit}/s": f"{rates['units_per_s']:,.0f}"},
                             refresh=False)  # drawn at the bar's own pace (a log file's is slow)


class Evaluate:
    """Held-out loss of the sampling parameters on fixed batches; its time is left out of the throughput."""

    def __init__(self, cfg: Config, training, eval_set: list[dict], writer: MetricsWriter, meter: ThroughputMeter,
                 bar: tqdm, progress: Progress):
        self.cadence = Cadence(cfg.train.eval_every)
        self.training, self.eval_set, self.writer, self.meter, self.bar = training, eval_set, writer, meter, bar
        self.progress = progress
        self.history: list[float] = []

    def run(self, step: int) -> None:
        loss_sum, weight = held_out_sums(self.training.eval_step, sampling_params(self.progress.state), self.eval_set)
        self.history.append(loss_sum / max(weight, 1.0))
        self.writer.write(step, {"eval_loss": self.history[-1]})
        self.bar.set_postfix(eval_loss=f"{self.history[-1]:.3f}", refresh=False)
        self.meter.restart(step)


class EvaluateTasks:
    """Benchmark tasks scored on the sampling parameters, logged as <task>/<metric> and kept in RUN_DIR/evals/."""

    def __init__(self, cfg: Config, benchmarks: Benchmarks, run_dir: pathlib.Path, writer: MetricsWriter,
                 meter: ThroughputMeter, progress: Progress):
        self.cadence = Cadence(cfg.train.eval_tasks_every or cfg.train.eval_every)
        self.benchmarks, self.run_dir, self.writer, self.meter = benchmarks, run_dir, writer, meter
        self.progress = progress

    def run(self, step: int) -> None:  # every process takes part: the parameters are sharded
        results = self.benchmarks.run(sampling_params(self.progress.state)[MAIN_GROUP], progress=False)
        self.writer.write(step, metric_values(write_result(self.run_dir, result_record(step, results))))
        self.meter.restart(step)


class Sample:
    """The task's pictures of progress while training (the final ones come with the summary)."""

    def __init__(self, task: Task, training, data: TaskData, run_dir: pathlib.Path, writer: MetricsWriter,
                 meter: ThroughputMeter, progress: Progress):
        self.cadence = Cadence(task.sample_every, at_end=False)
        self.task, self.training, self.data, self.run_dir, self.meter = task, training, data, run_dir, meter
        self.writer, self.progress = writer, progress

    def run(self, step: int) -> None:  # every process takes part: the parameters are sharded
        weights = self.training.layout.models.weights(sampling_params(self.progress.state))
        self.writer.log_pictures(step, self.task.sample(weights, self.data, self.run_dir, step=step))
        self.meter.restart(step)


class Save:
    """A checkpoint of the state and the data position, with the records up to it on disk first."""

    def __init__(self, cfg: Config, ckpt: Checkpointer, meta: dict, writer: MetricsWriter, progress: Progress):
        self.cadence = Cadence(cfg.checkpoint.every, cfg.checkpoint.every_minutes)
        self.ckpt, self.meta, self.writer, self.progress = ckpt, meta, writer, progress
        self.saving = False

    def run(self, step: int) -> None:
        self.writer.flush()  # the records up to a checkpoint survive whatever kills the run after it
        self.saving = True  # left so by a failed save: the error is the checkpoint's own, with nothing to rescue
        self.ckpt.save(step, self.progress.state, self.progress.data_state, self.meta)
        self.saving = False
        self.progress.last_saved = step
        self.cadence.ran()

    def after_os_error(self, failure: OSError, records: StepRecords) -> JaxgenError:
        """What a run stops with when a file it writes while training fails (a full disk under tensorboard/ or
        samples/), once the steps since its last checkpoint are saved: a log file must not cost them. Not where
        processes save together: a failure on one host leaves the others stepping on (only process 0 writes
        records), and a save alone would wait for them."""
        return self.saved_before_stopping(describe_os_error(failure), records, OutputWriteError)

    def after_data_error(self, failure: DataError, records: StepRecords) -> JaxgenError:
        """What a run of one process stops with when a batch cannot be read (an image damaged since the run
        started), once the steps before it are saved: the resumed run reads that batch again, where
        `images.bad_images=skip` passes over the image."""
        return self.saved_before_stopping(str(failure), records, DataError)

    def saved_before_stopping(self, failed: str, records: StepRecords, error: type[JaxgenError]) -> JaxgenError:
        """`error` saying `failed`, once the steps since the last checkpoint are saved, and what is safe."""
        if (stop := records.settle_after_failure()) is not None:  # a last step the run must not save
            return stop
        step, last = int(self.progress.state.step), self.progress.last_saved
        kept = f"checkpoint {last} is the newest" if last is not None else "no checkpoint was saved"
        if step == last or self.progress.data_state is None:  # nothing trained since the last checkpoint
            return error(f"{failed}; no step is lost ({kept}); {again()} once it is mended")
        if jax.process_count() > 1:
            return error(f"{failed}; {kept} (a run of {jax.process_count()} processes saves together, so step "
                         f"{step} was not saved); {again()} once it is mended")
        try:
            self.ckpt.save(step, self.progress.state, self.progress.data_state, self.meta)
            self.ckpt.wait()
        except Exception as err:  # the same full disk, most likely
            why = getattr(err, "reason", None) or first_line(err, 200)  # a CheckpointWriteError's says it shortest
            why = "for the same reason" if why in failed else f"({why})"
            return error(f"{failed}; saving step {step} before stopping failed too {why}; {kept}")
        self.progress.last_saved = step
        return error(f"{failed}; checkpoint {step} was saved first, so no step is lost; {again()} once it is mended")

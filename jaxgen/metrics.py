"""Where numbers go: JSONL (always), TensorBoard, a loss-curve PNG, experiment trackers; throughput and MFU.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
import sys
import time
from typing import TYPE_CHECKING, Self

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import Preempted
from jaxgen.files import write_atomic

if TYPE_CHECKING:
    from jaxgen.trackers import Outcome, Trackers

# Dense bf16 peak FLOP/s per chip from vendor data sheets.
KNOWN_PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
}


def measure_matmul_peak(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of an n x n matmul on the default device: the practical peak on CPUs.

    Inputs in `dtype`, accumulated in float32, as the models' matmuls are.
    """
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    mm(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times))


def peak_flops_per_device(configured: float | None, compute_dtype: str = "float32") -> tuple[float, str]:
    """(FLOP/s, where the figure came from) for MFU: configured, a data sheet, or measured in the compute dtype."""
    if configured:
        return configured, "config"
    kind = jax.devices()[0].device_kind
    for name, flops in KNOWN_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"data sheet ({kind})"
    return measure_matmul_peak(dtype=jnp.dtype(compute_dtype)), f"measured {compute_dtype} matmul ({kind})"


class ThroughputMeter:
    """Units per second over the steps since the last reading; time spent outside training steps is left out."""

    def __init__(self, units_per_step: float, flops_per_unit: float, peak_flops: float, step: int):
        self.units_per_step, self.flops_per_unit, self.peak_flops = units_per_step, flops_per_unit, peak_flops
        self.readings: list[float] = []
        self.restart(step)

    def restart(self, step: int) -> None:
        """Measure from now, as after step `step` (call after an evaluation or a sample grid)."""
        self._time, self._step = time.perf_counter(), step

    def read(self, step: int) -> dict[str, float]:
        """{units_per_s, mfu} since the last reading, as the record of `step` carries them."""
        now = time.perf_counter()
        rate = (step - self._step) * self.units_per_step / max(now - self._time, 1e-9)
        self._time, self._step = now, step
        self.readings.append(rate)
        return {"units_per_s": rate, "mfu": rate * self.flops_per_unit / self.peak_flops}

    def median(self) -> dict[str, float | None]:
        if not self.readings:
            return {"units_per_s": None, "mfu": None}
        rate = float(np.median(self.readings))
        return {"units_per_s": rate, "mfu": rate * self.flops_per_unit / self.peak_flops}


class MetricsWriter:
    def __init__(self, run_dir: pathlib.Path, tensorboard: bool, resumed_at: int | None,
                 trackers: Trackers | None = None):
        """`resumed_at`: the checkpoint step a resumed run continues from; None for a run from step 0.

        Records a killed run wrote after that point (or at all, for a run that
        starts over) are dropped, in metrics.jsonl and for TensorBoard, so every
        step appears once. `trackers` (`jaxgen.trackers.open_trackers`) get every
        record and picture too, and are closed with the writer; as a context
        manager, the writer tells them how the run ended.
        """
        self.enabled = jax.process_index() == 0
        self.trackers = trackers
        self.path = run_dir / "metrics.jsonl"
        if self.enabled and self.path.exists():
            kept = [r for r in read_metrics(self.path) if resumed_at is not None and r["step"] <= resumed_at]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._tb = None
        if self.enabled and tensorboard:
            self._tb = TensorBoardFile(run_dir / "tensorboard", purge_step=0 if resumed_at is None else resumed_at + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        # Non-finite values (a skipped step's loss) are null: metrics.jsonl stays strict JSON.
        finite = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        record = {"step": step, **{k: finite.get(k) for k in values}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb:
            self._tb.add_scalars(step, finite)
        if self.trackers:
            self.trackers.log_scalars(step, finite)

    def log_image(self, step: int, name: str, png: str | pathlib.Path) -> None:
        """A picture the run wrote (loss curve, sample grid), for the trackers; TensorBoard gets its own."""
        if self.enabled and self.trackers:
            self.trackers.log_image(step, name, pathlib.Path(png))

    def log_pictures(self, step: int, entries: dict) -> None:
        """The pictures among a task's sample entries (the paths of PNG files), for the trackers."""
        for name, value in entries.items():
            if isinstance(value, str) and value.endswith(".png"):
                self.log_image(step, name, value)

    def flush(self) -> None:
        """Make everything written so far durable (at checkpoints and when the run stops)."""
        if self._tb:
            self._tb.flush()

    def close(self, outcome: Outcome = "finished") -> None:
        """`outcome`: how the run ended, as the trackers record it."""
        if self._tb:
            self._tb.close()
        if self.trackers:
            self.trackers.close(outcome)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close("finished" if error is None else "preempted" if isinstance(error, Preempted) else "failed")


def tensorboardx():
    """The tensorboardX package, imported without PyTorch.

    tensorboardX imports torch when it is installed (seconds of start-up) for
    its PyTorch helpers, which jaxgen never calls; hiding torch for the
    duration of the import skips it.
    """
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX expects
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    import tensorboardX

    return tensorboardX


class TensorBoardFile:
    """Scalars in a TensorBoard event file, written in the caller's thread (no TensorFlow needed).

    tensorboardX's SummaryWriter queues events for a thread whose `flush` does
    not drain the queue, so what a checkpoint's flush promised could still be
    lost to a kill; here `flush` means on disk.
    """

    FLUSH_EVERY_S = 30.0

    def __init__(self, directory: pathlib.Path, purge_step: int):
        tensorboardx()
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        directory.mkdir(parents=True, exist_ok=True)
        self._events = EventsWriter(str(directory / "events"))
        # TensorBoard hides the earlier files' events from purge_step on: a resumed run's steps appear once.
        self._events.write_event(Event(wall_time=time.time(), step=purge_step,
                                       session_log=SessionLog(status=SessionLog.START)))
        self._last_flush = time.monotonic()

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for key, value in values.items():
            self._events.write_event(Event(wall_time=time.time(), step=step, summary=scalar(key, value)))
        if time.monotonic() - self._last_flush > self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        self._events.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        self._events.close()


def read_metrics(path: pathlib.Path) -> list[dict]:
    """Every complete record; a last line cut short by a kill is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_loss_curve(metrics_path: pathlib.Path, out_png: pathlib.Path, loss_name: str = "loss") -> None:
    """Train and eval loss against step, as a PNG for people to look at; `loss_name` labels the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:  # a marker, so that a single point shows too
            ax.plot(*zip(*points), style if len(points) > 1 else "o", label=key.replace("_", " "))
    write_against_step(fig, ax, loss_name, out_png)


def write_against_step(fig, ax, ylabel: str, out_png: pathlib.Path) -> None:
    """Finish a figure of figures against step (labels, grid, legend) and write it as a PNG, atomically."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(out_png, png.getvalue())
